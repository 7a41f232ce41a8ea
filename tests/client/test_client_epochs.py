"""``eventcore.client`` across a stream divergence on a real API process (a failover that lost
acknowledged appends, played on one node by ``tests/divergence.py``): the live stream yields
one :class:`HistoryDiverged` with the right ``resume_after``/``epoch`` and then the new history
with no gap and no duplicate, keeps the full id (``<seq>.<epoch>``) as its cursor and resumes
with it after a server restart (no second reset); a saved cursor of the old epoch is reset once,
one of the new epoch is not; JSON pages carry the epoch and the reset."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from divergence import lose_tail
from service_support import API_KEY, Service

from eventcore import EventLog
from eventcore.client import (
    AsyncClient,
    Client,
    Envelope,
    EventStream,
    HistoryDiverged,
    HistoryGone,
    StreamItem,
)

# a divergence gives its shard an epoch, which every later session there sees: these tests
# (they assert the epochs) each have a namespace and an API process of their own
pytestmark = pytest.mark.own_api

DEADLINE = 90


async def _diverged_session(c: AsyncClient, log: EventLog) -> str:
    """A session of 10 events whose seqs 8..10 were lost and 8..13 written again."""
    sid = (await c.create_session("echo")).session_id
    await log.append_many([Envelope(type="note", session_id=sid, payload={"v": "old", "i": i})
                           for i in range(9)])  # seqs 2..10
    await lose_tail(log, sid, 7)
    await log.append_many([Envelope(type="note", session_id=sid, payload={"v": "new", "i": i})
                           for i in range(6)])  # seqs 8..13 again, in a new epoch
    return sid


async def _take(stream: EventStream, items: list[StreamItem], until: int) -> None:
    """Read ``stream`` into ``items`` until an envelope of seq ``until`` arrived."""
    while True:
        item = await stream.__anext__()
        items.append(item)
        if isinstance(item, Envelope) and item.seq >= until:
            return


async def test_a_live_stream_is_reset_once_and_resumes_in_the_new_epoch(
    service: Service, service_log: EventLog
) -> None:
    async with AsyncClient(service.url, API_KEY, backoff_max_s=0.5) as c:
        sid = (await c.create_session("echo")).session_id
        await service_log.append_many([Envelope(type="note", session_id=sid,
                                                payload={"v": "old", "i": i})
                                       for i in range(9)])
        items: list[StreamItem] = []
        with anyio.fail_after(DEADLINE):
            async with c.events(sid) as stream:
                await _take(stream, items, 10)
                # no divergence yet: the cursor is the bare seq
                assert (stream.after, stream.epoch, stream.last_event_id) == (10, "0", "10")
                await lose_tail(service_log, sid, 7)
                await service_log.append_many([Envelope(type="note", session_id=sid,
                                                        payload={"v": "new", "i": i})
                                               for i in range(6)])  # seqs 8..13 again
                await _take(stream, items, 13)
                resets = [i for i in items if isinstance(i, HistoryGone)]
                assert len(resets) == 1 and isinstance(resets[0], HistoryDiverged), items
                reset = resets[0]
                epoch = reset.epoch
                assert (reset.after, reset.resume_after, reset.seen_epoch) == (10, 7, "0")
                assert len(epoch) == 16 and epoch.isdigit()
                assert (stream.after, stream.epoch) == (13, epoch)
                assert stream.last_event_id == f"13.{epoch}"
                # a graceful restart: the stream resumes with `13.<epoch>`, so no second reset
                await anyio.to_thread.run_sync(service.api.stop)
                await service_log.emit(sid, "note", {"v": "while down"})  # 14
                await anyio.to_thread.run_sync(service.api.start)
                await service_log.end_session(sid)  # 15
                items += [i async for i in stream]
        at = items.index(reset)
        assert [i.seq for i in items[:at] if isinstance(i, Envelope)] == list(range(1, 11))
        after = items[at + 1:]
        assert all(isinstance(i, Envelope) for i in after), after  # the one reset
        assert [i.seq for i in after if isinstance(i, Envelope)] == list(range(8, 16))
        assert [i.payload for i in after[:6] if isinstance(i, Envelope)] == [
            {"v": "new", "i": i} for i in range(6)]
        assert (stream.after, stream.epoch) == (15, epoch)


async def test_a_saved_cursor_of_the_old_epoch_is_reset_once(
    service: Service, service_log: EventLog
) -> None:
    async with AsyncClient(service.url, API_KEY) as c:
        sid = await _diverged_session(c, service_log)
        await service_log.end_session(sid)  # 14
        with anyio.fail_after(DEADLINE):
            # a reader that saved (10, "0") before the failover: one reset, then 8..14
            stale = [i async for i in c.events(sid, after=10, epoch="0")]
            reset = stale[0]
            assert isinstance(reset, HistoryDiverged), stale
            assert (reset.after, reset.resume_after, reset.seen_epoch) == (10, 7, "0")
            epoch = reset.epoch
            assert [i.seq for i in stale[1:] if isinstance(i, Envelope)] == list(range(8, 15))
            assert all(isinstance(i, Envelope) for i in stale[1:])
            assert [i.payload["v"] for i in stale[1:7] if isinstance(i, Envelope)] == ["new"] * 6
            # one that saved a cursor of the new epoch goes on from it, with no reset
            fresh = [i async for i in c.events(sid, after=12, epoch=epoch)]
            assert [(type(i), getattr(i, "seq", None)) for i in fresh] == [
                (Envelope, 13), (Envelope, 14)]
            # one that held only the kept prefix (epoch 0) moves to the new epoch silently
            kept = c.events(sid, after=6)
            got = [i async for i in kept]
            assert [i.seq for i in got if isinstance(i, Envelope)] == list(range(7, 15))
            assert all(isinstance(i, Envelope) for i in got)
            assert (kept.after, kept.epoch) == (14, epoch)

            # JSON pages: the epoch on every page, the reset on a stale cursor's
            page = await c.history(sid, after=10)
            assert page.events == [] and page.next_after == 7 and page.epoch == epoch
            assert isinstance(page.reset, HistoryDiverged)
            assert (page.reset.after, page.reset.resume_after, page.reset.epoch) == (10, 7, epoch)
            page = await c.history(sid, after=page.next_after, epoch=page.epoch)
            assert [e.seq for e in page.events] == list(range(8, 15))
            assert page.reset is None and page.epoch == epoch and page.next_after == 14
            page = await c.history(sid, after=14, epoch=epoch)
            assert (page.events, page.next_after, page.epoch, page.reset) == ([], 14, epoch, None)

    def blocking() -> tuple[list[StreamItem], str, str]:
        with Client(service.url, API_KEY) as bc, bc.events(sid, after=10) as stream:
            return list(stream), stream.epoch, stream.last_event_id

    with anyio.fail_after(DEADLINE):
        got, sync_epoch, last_id = await anyio.to_thread.run_sync(blocking)
    assert isinstance(got[0], HistoryDiverged) and got[0].resume_after == 7
    assert [i.seq for i in got[1:] if isinstance(i, Envelope)] == list(range(8, 15))
    assert (sync_epoch, last_id) == (epoch, f"14.{epoch}")


def _readme_follow() -> Any:
    """The README's reader of a saved cursor ("Client SDKs"), verbatim."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "HistoryDiverged):  # check before" in block]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["follow"]


async def test_the_readme_reader_drops_what_was_rewritten(
    service: Service, service_log: EventLog
) -> None:
    follow = _readme_follow()
    async with AsyncClient(service.url, API_KEY) as c:
        sid = (await c.create_session("echo")).session_id
        await service_log.append_many([Envelope(type="note", session_id=sid,
                                                payload={"v": "old", "i": i})
                                       for i in range(9)])
        page = await c.history(sid)
        held = {e.seq: e for e in page.events}  # 1..10, saved as (10, "0")
        assert (page.next_after, page.epoch) == (10, "0")
        await lose_tail(service_log, sid, 7)
        await service_log.append_many([Envelope(type="note", session_id=sid,
                                                payload={"v": "new", "i": i})
                                       for i in range(6)])
        await service_log.end_session(sid)  # 14
        with anyio.fail_after(DEADLINE):
            saved = await follow(c, sid, held, (page.next_after, page.epoch))
        epoch = (await c.history(sid, after=7)).epoch
        assert epoch != "0" and saved == (14, epoch)
        assert sorted(held) == list(range(1, 15))
        assert [held[s].payload for s in range(8, 14)] == [{"v": "new", "i": i}
                                                          for i in range(6)]
