"""Stream epochs over HTTP on a real API process: a live SSE client whose seqs were lost and
reused (what a failover with asynchronous replication does, played on one node) gets
``stream.reset`` and then the new history, never the reused seqs silently; JSON pages say the
epoch and reset too; a resume beyond the tail (``Last-Event-ID: 999`` on a short session) gets
the reset instead of silence; before any divergence the wire format is unchanged."""

from __future__ import annotations

import json
import uuid

import anyio
import httpx
import pytest
from divergence import lose_tail
from httpx_sse import ServerSentEvent, aconnect_sse
from hypothesis import given
from hypothesis import strategies as st
from service_support import API_KEY, Service

from eventcore import Envelope, EventLog
from eventcore.server._http._problems import Problem
from eventcore.server._http._sse import _parse_after

KEY = {"Authorization": f"Bearer {API_KEY}"}


async def _session(c: httpx.AsyncClient) -> str:
    body = {"agent": "echo", "idempotency_key": f"k-{uuid.uuid4().hex}"}
    r = await c.post("/v1/sessions", json=body, headers=KEY)
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def test_a_live_client_of_reused_seqs_is_reset(
    shared_service: Service, shared_log: EventLog
) -> None:
    async with shared_service.client() as c:
        sid = await _session(c)
        await shared_log.append_many([Envelope(type="note", session_id=sid,
                                               payload={"v": "old", "i": i}) for i in range(9)])
        path = f"/v1/sessions/{sid}/events"
        seen: list[ServerSentEvent] = []
        async with aconnect_sse(c, "GET", path, headers=KEY) as sse:
            it = sse.aiter_sse()
            with anyio.fail_after(30):
                while not seen or seen[-1].id != "10":
                    seen.append(await it.__anext__())
            # no divergence yet: ids are bare seqs, as before epochs
            assert [e.id for e in seen] == [str(i) for i in range(1, 11)]
            await lose_tail(shared_log, sid, 7)
            await shared_log.append_many([Envelope(type="note", session_id=sid,
                                                   payload={"v": "new", "i": i})
                                          for i in range(6)])  # seqs 8..13 again
            with anyio.fail_after(30):
                while seen[-1].event != "stream.reset":
                    seen.append(await it.__anext__())
                    assert '"new"' not in seen[-1].data, "a reused seq before the reset"
                reset = json.loads(seen[-1].data)
                epoch = reset["epoch"]
                assert reset["reason"] == "diverged" and reset["resume_after"] == 7
                assert reset["seen_epoch"] == "0" and epoch != "0"
                assert seen[-1].id == f"7.{epoch}"
                new: list[ServerSentEvent] = []
                while len(new) < 6:
                    new.append(await it.__anext__())
        assert [e.id for e in new] == [f"{s}.{epoch}" for s in range(8, 14)]
        assert [json.loads(e.data)["payload"] for e in new] == [{"v": "new", "i": i}
                                                                for i in range(6)]

        # JSON pages: a reader that held seq 10 of the old epoch is reset too
        page = (await c.get(f"{path}?format=json&after=10", headers=KEY)).json()
        assert page["events"] == [] and page["next_after"] == 7 and page["epoch"] == epoch
        assert page["reset"]["reason"] == "diverged"
        # one that held only the surviving prefix goes on, and learns the epoch
        page = (await c.get(f"{path}?format=json&after=7", headers=KEY)).json()
        assert [e["seq"] for e in page["events"]] == list(range(8, 14))
        assert page["epoch"] == epoch and "reset" not in page
        page = (await c.get(f"{path}?format=json&after=13&epoch={epoch}", headers=KEY)).json()
        assert page == {"events": [], "next_after": 13, "epoch": epoch}
        # an SSE resume with the new epoch's id: no reset
        async with aconnect_sse(c, "GET", path,
                                headers={**KEY, "Last-Event-ID": f"12.{epoch}"}) as sse:
            with anyio.fail_after(30):
                first = await sse.aiter_sse().__anext__()
        assert first.id == f"13.{epoch}" and first.event == "note"


async def test_a_resume_beyond_the_tail_is_reset(
    shared_service: Service, shared_log: EventLog
) -> None:
    async with shared_service.client() as c:
        sid = await _session(c)
        await shared_log.append_many([Envelope(type="note", session_id=sid, payload=i)
                                      for i in range(33)])  # 34 events
        path = f"/v1/sessions/{sid}/events"
        page = (await c.get(f"{path}?format=json&after=999", headers=KEY)).json()
        assert page["next_after"] == 34 and page["reset"]["after"] == 999
        epoch = page["epoch"]
        async with aconnect_sse(c, "GET", path,
                                headers={**KEY, "Last-Event-ID": "999"}) as sse:
            it = sse.aiter_sse()
            with anyio.fail_after(30):
                reset = await it.__anext__()
                assert reset.event == "stream.reset"
                data = json.loads(reset.data)
                assert (data["after"], data["resume_after"]) == (999, 34)
                await shared_log.emit(sid, "note", "next")
                nxt = await it.__anext__()
        # the epoch this reader was moved to (a second bump by the SSE resume is allowed)
        assert nxt.id == f"35.{data['epoch']}" and int(data["epoch"]) >= int(epoch)
        bad = await c.get(path, headers={**KEY, "Last-Event-ID": "5.x"})
        assert bad.status_code == 400


async def test_beyond_the_tail_of_an_ended_session_resets_and_ends(
    shared_service: Service, shared_log: EventLog
) -> None:
    async with shared_service.client() as c:
        sid = await _session(c)
        await shared_log.emit(sid, "session.ended", {"reason": "done"})
        path = f"/v1/sessions/{sid}/events"
        assert (await c.get(path, headers={**KEY, "Last-Event-ID": "2"})).status_code == 204
        async with aconnect_sse(c, "GET", path,
                                headers={**KEY, "Last-Event-ID": "50"}) as sse:
            with anyio.fail_after(30):
                events = [e async for e in sse.aiter_sse()]
        assert [e.event for e in events] == ["stream.reset"]
        assert json.loads(events[0].data)["resume_after"] == 2


@given(st.text(max_size=70) | st.from_regex(r"\A[0-9]{1,25}(\.[0-9]{0,25})?\Z")
       | st.from_regex(r"\A[0-9]{1,5}\.[1-9][0-9]{15}\Z"))
def test_hostile_last_event_ids(raw: str) -> None:
    """A Last-Event-ID is a seq or seq.epoch (digits), anything else a clear 400."""
    try:
        cursor, gen = _parse_after(None, raw)
    except Problem as exc:
        assert exc.status == 400
        return
    if not raw:
        assert (cursor, gen) == (0, "")
        return
    seq, sep, epoch = raw.partition(".")
    assert cursor == int(seq)
    assert (gen, sep) == ("", "") or (gen == epoch and len(gen) == 16 and gen.isdigit())


def test_a_bad_epoch_parameter_is_422() -> None:
    with pytest.raises(Problem) as bad:
        _parse_after(3, None, "x1")
    assert bad.value.status == 422
    assert _parse_after(3, None, "0") == (3, "")
    assert _parse_after(3, None, "1764655000000001") == (3, "1764655000000001")
    for bad in ("17", "000", "1.5"):
        with pytest.raises(Problem):
            _parse_after(3, None, bad)
    for bad_id in ("1.5", "1.0", "1.", "1.0000000000000000"):
        with pytest.raises(Problem):
            _parse_after(None, bad_id)



async def _rewritten_to_the_same_length(c: httpx.AsyncClient, log: EventLog) -> str:
    """A session whose seqs 8..14 were lost and reused: at seq 14 again, in a new epoch, with
    nothing appended since."""
    sid = await _session(c)
    await log.append_many([Envelope(type="note", session_id=sid, payload={"v": "old", "i": i})
                           for i in range(13)])
    page = (await c.get(f"/v1/sessions/{sid}/events?format=json&after=13", headers=KEY)).json()
    assert page["next_after"] == 14
    await lose_tail(log, sid, 7)
    await log.append_many([Envelope(type="note", session_id=sid, payload={"v": "new", "i": i})
                           for i in range(7)])  # seqs 8..14 again
    return sid


async def test_a_json_page_at_the_tail_with_a_stale_epoch_is_reset(
    shared_service: Service, shared_log: EventLog
) -> None:
    """The page a reader that held seq 14 of the old epoch reads is empty: it must still be
    the reset, not a caught-up page in epoch 0."""
    async with shared_service.client() as c:
        sid = await _rewritten_to_the_same_length(c, shared_log)
        path = f"/v1/sessions/{sid}/events"
        page = (await c.get(f"{path}?format=json&after=14&epoch=0", headers=KEY)).json()
        assert page["events"] == [] and page["next_after"] == 7, page
        assert page["reset"]["reason"] == "diverged" and page["reset"]["after"] == 14
        epoch = page["epoch"]
        assert epoch != "0" and page["reset"]["seen_epoch"] == "0"
        # in the new epoch the same cursor is simply caught up; below genf it just moves on
        page = (await c.get(f"{path}?format=json&after=14&epoch={epoch}", headers=KEY)).json()
        assert page == {"events": [], "next_after": 14, "epoch": epoch}
        page = (await c.get(f"{path}?format=json&after=7&epoch=0", headers=KEY)).json()
        assert [e["seq"] for e in page["events"]] == list(range(8, 15)) and "reset" not in page


async def test_an_sse_resume_at_the_tail_with_a_stale_epoch_is_reset_at_once(
    shared_service: Service, shared_log: EventLog
) -> None:
    """``Last-Event-ID: 14`` (epoch 0) on the rewritten session: the reset comes on its own,
    not with the next append (there is none here)."""
    async with shared_service.client() as c:
        sid = await _rewritten_to_the_same_length(c, shared_log)
        path = f"/v1/sessions/{sid}/events"
        async with aconnect_sse(c, "GET", path, headers={**KEY, "Last-Event-ID": "14"}) as sse:
            it = sse.aiter_sse()
            with anyio.fail_after(10):  # no append in between
                reset = await it.__anext__()
            assert reset.event == "stream.reset", reset
            data = json.loads(reset.data)
            epoch = data["epoch"]
            assert (data["reason"], data["after"], data["resume_after"]) == ("diverged", 14, 7)
            assert data["seen_epoch"] == "0" and epoch != "0" and reset.id == f"7.{epoch}"
            with anyio.fail_after(30):
                new = [await it.__anext__() for _ in range(7)]
        assert [e.id for e in new] == [f"{s}.{epoch}" for s in range(8, 15)]
        assert [json.loads(e.data)["payload"] for e in new] == [{"v": "new", "i": i}
                                                                for i in range(7)]
