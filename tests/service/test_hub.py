"""The SSE hub against a real Redis: exact seam, fan-out, slow clients, missed notifications."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventcore import Envelope, EventLog, HistoryGone, SessionNotFound
from eventcore._follow import Event
from eventcore.server._hub import Hub, Subscription, _bulk
from eventcore.subscribers import Persistence, SubscriberRunner


@pytest.fixture(params=["pubsub", "xread"])
async def hub(request: pytest.FixtureRequest, event_log: EventLog) -> AsyncIterator[Hub]:
    async with Hub(event_log, live=request.param, buffer=16, page=8, resync_s=0.2,
                   xread_block_ms=50) as h:
        yield h


async def collect(sub: Subscription, until: int) -> list[int]:
    seqs: list[int] = []
    async for batch in sub.batches():
        assert not isinstance(batch, HistoryGone)
        seqs += [e.seq for e in batch]
        if seqs and seqs[-1] >= until:
            break
    return seqs


async def emit(log: EventLog, sid: str, n: int) -> None:
    for i in range(n):
        await log.append(Envelope(type="input", session_id=sid, payload={"i": i}))


async def test_catch_up_then_live_exact_seam(hub: Hub, event_log: EventLog) -> None:
    s = await event_log.create_session("echo")
    await emit(event_log, s.session_id, 20)  # history longer than a page
    async with hub.subscribe(s.session_id, after=3) as sub, anyio.create_task_group() as tg:
        tg.start_soon(emit, event_log, s.session_id, 30)
        seqs = await collect(sub, 51)
    assert seqs == list(range(4, 52))


async def test_many_clients_one_session_and_type_filter(hub: Hub, event_log: EventLog) -> None:
    s = await event_log.create_session("echo")
    results: dict[int, list[int]] = {}

    async def client(i: int, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with hub.subscribe(s.session_id, after=0) as sub:
            task_status.started()
            results[i] = await collect(sub, 41)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            await tg.start(client, i)
        await emit(event_log, s.session_id, 20)
        for _ in range(20):
            await event_log.signal(s.session_id, "k", 1)
    assert all(v == list(range(1, 42)) for v in results.values())

    async with hub.subscribe(s.session_id, after=0, types={"signal"}) as sub:
        got: list[Event] = []
        async for batch in sub.batches():
            assert not isinstance(batch, HistoryGone)
            got += batch
            if sub.cursor >= 41:
                break
    assert [e.type for e in got] == ["signal"] * 20
    assert [e.seq for e in got] == list(range(22, 42))


async def test_slow_client_falls_back_to_catch_up(hub: Hub, event_log: EventLog) -> None:
    s = await event_log.create_session("echo")
    async with hub.subscribe(s.session_id, after=1) as slow, \
            hub.subscribe(s.session_id, after=1) as fast:
        it = slow.batches()
        await emit(event_log, s.session_id, 1)
        first = await it.__anext__()  # the slow client reads once, then stops reading
        async with anyio.create_task_group() as tg:
            tg.start_soon(emit, event_log, s.session_id, 99)
            assert await collect(fast, 101) == list(range(2, 102))  # not held back
        assert hub.stats.lagged_clients >= 1  # the slow one overflowed its 16-event buffer
        seqs = [e.seq for e in first] if not isinstance(first, HistoryGone) else []
        async for batch in it:
            assert not isinstance(batch, HistoryGone)
            seqs += [e.seq for e in batch]
            if seqs[-1] >= 101:
                break
        await it.aclose()
    assert seqs == list(range(2, 102))


async def test_missed_notification_is_recovered(hub: Hub, event_log: EventLog) -> None:
    s = await event_log.create_session("echo")
    async with hub.subscribe(s.session_id, after=1) as sub:
        it = sub.batches()
        await emit(event_log, s.session_id, 1)
        assert [e.seq for e in await it.__anext__()] == [2]  # type: ignore[union-attr]
        # Write behind the append script's back: no notification is published for seq 3.
        keys = event_log.keys.session(s.session_id)
        await event_log.redis.xadd(keys.stream, {"t": "input", "d": b'{"seq":3,"type":"input",'
                                   b'"session_id":"' + s.session_id.encode() + b'"}'}, id="0-3")
        await event_log.redis.hset(keys.meta, "seq", 3)
        batch = await it.__anext__()  # the periodic sweep finds it
        assert not isinstance(batch, HistoryGone)
        assert [e.seq for e in batch] == [3]
        await it.aclose()


async def test_ended_session_ends_the_subscription(hub: Hub, event_log: EventLog) -> None:
    s = await event_log.create_session("echo")
    async with hub.subscribe(s.session_id, after=0) as sub, anyio.create_task_group() as tg:
        tg.start_soon(event_log.end_session, s.session_id)
        types = []
        async for batch in sub.batches():
            assert not isinstance(batch, HistoryGone)
            types += [e.type for e in batch]
    assert types == ["session.created", "session.ended"]
    assert hub.watched == 0



async def test_trimmed_history_is_served_from_the_archive(
    hub: Hub, event_log: EventLog, tmp_path: Path
) -> None:
    """Tiered replay: the hub's catch-up reads what Redis has trimmed from persistence, then
    continues in Redis and live, without a gap."""
    s = await event_log.create_session("echo")
    await emit(event_log, s.session_id, 30)
    async with Persistence(event_log, f"sqlite+aiosqlite:///{tmp_path / 'h.sqlite3'}") as p:
        await SubscriberRunner(event_log, p, block_ms=50).drain()
        await event_log.redis.xtrim(event_log.keys.session(s.session_id).stream,
                                    minid="0-20", approximate=False)
        event_log.archive = p
        try:
            async with hub.subscribe(s.session_id, after=0) as sub, \
                    anyio.create_task_group() as tg:
                tg.start_soon(emit, event_log, s.session_id, 5)
                seqs = await collect(sub, 36)
            page, _ = await hub.read_page(s.session_id, 0, 10)  # the JSON pages too
        finally:
            event_log.archive = None
    assert seqs == list(range(1, 37))
    assert [e.seq for e in page] == list(range(1, 11))
    assert page[0].type == "session.created"


async def test_catch_up_pages_are_bounded_in_bytes(event_log: EventLog) -> None:
    """Pages stop at ``buffer_bytes`` (past their first event) and at the first blob-backed
    event, whatever the entry count allows: a client's catch-up never holds more."""
    budget = 64 * 1024
    s = await event_log.create_session("echo")
    sid = s.session_id
    await event_log.append_many([Envelope(type="big", session_id=sid, payload="x" * 10_000)
                                 for _ in range(40)])
    await event_log.append_many([Envelope(type="blob", session_id=sid, payload="y" * 100_000)
                                 for _ in range(3)])  # over the inline limit: blobs
    await emit(event_log, sid, 5)
    last = await event_log.last_seq(sid)
    async with Hub(event_log, buffer_bytes=budget, page=500) as hub:
        seqs: list[int] = []
        pages = 0
        done = False
        while not done:
            page, done = await hub.read_page(sid, seqs[-1] if seqs else 0)
            pages += 1
            assert page, "a page always holds at least one event"
            if len(page) > 1:
                assert sum(len(e.data) for e in page) <= budget
            assert sum(1 for e in page if e.type == "blob") <= 1
            for e in page:
                if e.type == "blob":
                    assert b"y" * 100_000 in e.data  # hydrated
            seqs += [e.seq for e in page]
        assert seqs == list(range(1, last + 1))
        assert pages >= 40 * 10_000 // budget + 3

        # the same bound through a subscription (what SSE and WebRTC iterate)
        async with hub.subscribe(sid, after=0) as sub:
            got: list[int] = []
            async for batch in sub.batches():
                assert not isinstance(batch, HistoryGone)
                assert len(batch) == 1 or sum(len(e.data) for e in batch) <= budget
                got += [e.seq for e in batch]
                if got[-1] == last:
                    break
        assert got == list(range(1, last + 1))


async def test_a_live_buffer_is_bounded_in_bytes(event_log: EventLog) -> None:
    """A client that stops reading overflows on bytes long before its event count: its
    buffer is dropped, and it later catches up from the log without a gap."""
    s = await event_log.create_session("echo")
    sid = s.session_id
    async with Hub(event_log, buffer=10_000, buffer_bytes=64 * 1024, xread_block_ms=50) as hub, \
            hub.subscribe(sid, after=1) as slow, hub.subscribe(sid, after=1) as fast:
        it = slow.batches()
        await emit(event_log, sid, 1)
        first = await it.__anext__()
        assert not isinstance(first, HistoryGone)
        async with anyio.create_task_group() as tg:
            async def big() -> None:
                for i in range(20):
                    await event_log.append(Envelope(type="big", session_id=sid,
                                                    payload={"i": i, "x": "x" * 10_000}))

            tg.start_soon(big)
            assert await collect(fast, 22) == list(range(2, 23))
        assert hub.stats.lagged_clients >= 1  # 200 KB against 64 KiB, 20 events of 10,000
        seqs = [e.seq for e in first]
        async for batch in it:
            assert not isinstance(batch, HistoryGone)
            seqs += [e.seq for e in batch]
            if seqs[-1] >= 22:
                break
        await it.aclose()
    assert seqs == list(range(2, 23))


# -- a session deleted and created again under its id --------------------------------------------

async def _emit_new(log: EventLog, sid: str, n: int) -> None:
    for i in range(n):
        await log.append(Envelope(type="input", session_id=sid, payload={"gen": "new", "i": i}))


async def _recreate(log: EventLog, sid: str, old_incarnation: str) -> None:
    assert await log.delete_session(sid)  # session.ended (reason deleted), then the keys go
    again = await log.create_session("echo", session_id=sid)
    assert again.incarnation != old_incarnation and again.last_seq == 1


async def _rest(it: AsyncIterator[list[Event] | HistoryGone]) -> list[Event]:
    """What the iterator yields until it ends with SessionNotFound (asserted)."""
    got: list[Event] = []
    with anyio.fail_after(10), pytest.raises(SessionNotFound):
        async for batch in it:
            assert not isinstance(batch, HistoryGone)
            for e in batch:
                assert b'"new"' not in e.data, f"an event of the new session: {e.data!r}"
            got += batch
    return got


async def test_a_live_follower_never_crosses_into_the_session_created_again(
    hub: Hub, event_log: EventLog
) -> None:
    """A follower past session.ended (until_ended=False) of a deleted session ends with
    SessionNotFound, never delivering the new session's events, whose seqs restart at 1 and
    pass its cursor."""
    s = await event_log.create_session("echo", session_id=f"again-{uuid.uuid4().hex[:8]}")
    sid = s.session_id
    await emit(event_log, sid, 3)
    async with hub.subscribe(sid, after=0, until_ended=False) as sub:
        it = sub.batches()
        with anyio.fail_after(10):
            assert await collect_from(it, 4) == [1, 2, 3, 4]  # caught up: live
        await _recreate(event_log, sid, s.incarnation)
        await _emit_new(event_log, sid, 10)  # seqs 2..11 of the new session
        got = await _rest(it)
    assert [(e.seq, e.type) for e in got] in ([], [(5, "session.ended")])


async def test_a_follower_behind_at_the_delete_never_crosses(hub: Hub, event_log: EventLog
                                                             ) -> None:
    """Catching up (pages of 8) when the session is deleted and created again: the next page
    would be the new session's."""
    s = await event_log.create_session("echo", session_id=f"again-{uuid.uuid4().hex[:8]}")
    sid = s.session_id
    await emit(event_log, sid, 40)
    async with hub.subscribe(sid, after=0) as sub:
        it = sub.batches()
        first = await it.__anext__()
        assert not isinstance(first, HistoryGone) and first[0].seq == 1
        await _recreate(event_log, sid, s.incarnation)
        await _emit_new(event_log, sid, 60)
        got = first + await _rest(it)
    seqs = [e.seq for e in got]
    assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] < 41


async def test_a_follower_ends_even_if_the_new_session_stays_below_its_cursor(
    hub: Hub, event_log: EventLog
) -> None:
    """Nothing of the new session passes the old cursor: the follower must not wait for it."""
    s = await event_log.create_session("echo", session_id=f"again-{uuid.uuid4().hex[:8]}")
    sid = s.session_id
    await emit(event_log, sid, 10)
    async with hub.subscribe(sid, after=0, until_ended=False) as sub:
        it = sub.batches()
        with anyio.fail_after(10):
            assert (await collect_from(it, 11))[-1] == 11
        await _recreate(event_log, sid, s.incarnation)
        await _emit_new(event_log, sid, 2)
        await _rest(it)


async def test_the_session_created_again_is_followed_while_old_followers_linger(
    hub: Hub, event_log: EventLog
) -> None:
    """A follower of the new session, subscribed while one of the old is still registered,
    gets the new session's events live, not after the old one's cursor."""
    s = await event_log.create_session("echo", session_id=f"again-{uuid.uuid4().hex[:8]}")
    sid = s.session_id
    await emit(event_log, sid, 20)
    async with hub.subscribe(sid, after=0, until_ended=False) as old:
        old_it = old.batches()
        with anyio.fail_after(10):
            assert (await collect_from(old_it, 21))[-1] == 21
        await _recreate(event_log, sid, s.incarnation)
        async with hub.subscribe(sid, after=0) as new:
            new_it = new.batches()
            with anyio.fail_after(10):
                assert await collect_from(new_it, 1) == [1]
                await emit(event_log, sid, 3)  # live, far below the old cursor
                assert await collect_from(new_it, 4) == [2, 3, 4]
            await new_it.aclose()
        await _rest(old_it)


async def collect_from(it: AsyncIterator[list[Event] | HistoryGone], until: int
                       ) -> list[int]:
    seqs: list[int] = []
    while not seqs or seqs[-1] < until:
        batch = await it.__anext__()
        assert not isinstance(batch, HistoryGone)
        seqs += [e.seq for e in batch]
    return seqs


@pytest.mark.parametrize("live", ["pubsub", "xread"])
async def test_the_live_path_alone_ends_a_follower_at_an_entry_of_another_incarnation(
    event_log: EventLog, live: Literal["pubsub", "xread"]
) -> None:
    """No sweep to help (resync_s of an hour): the entries the live path fetches name their
    incarnation, and the first of another one ends the follower."""
    s = await event_log.create_session("echo", session_id=f"again-{uuid.uuid4().hex[:8]}")
    sid = s.session_id
    async with Hub(event_log, live=live, resync_s=3600, xread_block_ms=50) as hub, \
            hub.subscribe(sid, after=0, until_ended=False) as sub:
        it = sub.batches()
        with anyio.fail_after(10):
            assert await collect_from(it, 1) == [1]
        await _recreate(event_log, sid, s.incarnation)
        await _emit_new(event_log, sid, 5)
        got = await _rest(it)
        assert [(e.seq, e.type) for e in got] in ([], [(2, "session.ended")])
        assert hub.watched == 0


def test_a_coalesced_write_parses_as_the_events_one_by_one() -> None:
    """Several events in one write (a client behind, or a batch): the bytes are each event's
    shared frame back to back, and a client's parser sees every event with its id, type and
    data, bare seq ids and ``<seq>.<gen>`` ids alike, and no empty event between them."""
    from httpx_sse._decoders import SSEDecoder

    from eventcore.server._http._sse import sse_frame

    gen = "1" * 16
    events = [Event(seq=1, type="input", data=b'{"seq":1,"x":"a\\nb"}'),
              Event(seq=2, type="output", data=b'{"seq":2}'),
              Event(seq=3, type="output", data=b'{"seq":3}', generation=gen)]
    frames = [sse_frame(e) for e in events]
    assert all(sse_frame(e) is f for e, f in zip(events, frames, strict=True))  # framed once
    decoder = SSEDecoder()
    got = [sse for line in b"".join(frames).decode().split("\n")[:-1]  # the last ends "\n"
           if (sse := decoder.decode(line)) is not None]
    assert [(s.id, s.event, s.data) for s in got] == [
        ("1", "input", '{"seq":1,"x":"a\\nb"}'), ("2", "output", '{"seq":2}'),
        (f"3.{gen}", "output", '{"seq":3}')]


def test_an_event_is_framed_as_sse_starlette_frames_it() -> None:
    """The live path frames an event's bytes itself: the same bytes as sse-starlette's
    encoder (``id:``, ``event:``, then ``data:`` per line of the data, newlines dropped from
    the id and type), for plain JSON, non-ASCII, line breaks of each kind, odd types and ids
    of either epoch form; data that is not UTF-8 fails as it did."""
    from sse_starlette import ServerSentEvent

    from eventcore.server._http._sse import _event_id, sse_frame

    gen = "1" * 16
    datas = [b'{"seq":1}', '{"x":"caf\u00e9 \u2603"}'.encode(), b'{"x":"a\\nb"}',
             b"a\nb", b"a\rb", b"a\r\nb", b"\n", b"", b"x\n\n", "\u00e9\n".encode()]
    types = ["input", "output", "session.ended", "t\ry", "t\nz", "\u00e9", ""]
    for data in datas:
        for typ in types:
            for generation in ("", "0", gen):
                ev = Event(seq=7, type=typ, data=data, generation=generation)
                want = ServerSentEvent(data=data.decode(), id=_event_id(7, generation),
                                       event=typ, sep="\n").encode()
                assert sse_frame(ev) == want, (data, typ, generation)
    with pytest.raises(UnicodeDecodeError):
        sse_frame(Event(seq=1, type="input", data=b'{"x":"\xff"}'))


async def test_stream_body_sends_skip_the_wrappers_but_the_start_does_not() -> None:
    """The SSE response sends its start through the wrapped ``send`` (the edge middleware adds
    its headers there) and its body straight to the send the edge middleware was given."""
    from eventcore.server._http._sse import _Progress, _Stream

    wrapped: list[str] = []
    raw: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"id: 1\nevent: input\ndata: {}\n\n"

    async def send_wrapped(message: dict[str, object]) -> None:
        wrapped.append(str(message["type"]))

    async def send_raw(message: dict[str, object]) -> None:
        body = message["body"]
        assert isinstance(body, bytes)
        raw.append(body)

    async def receive() -> dict[str, object]:
        await anyio.sleep_forever()
        raise AssertionError

    stream = _Stream(body(), ping=60, sep="\n")
    stream.progress = _Progress(0)
    scope = {"type": "http", "method": "GET", "eventcore.body_send": send_raw}
    await stream(scope, receive, send_wrapped)  # type: ignore[arg-type]
    assert wrapped == ["http.response.start"]
    assert raw == [b"id: 1\nevent: input\ndata: {}\n\n", b""]


async def _parked(sub: Subscription, cursor: int = 0) -> None:
    """Until the follower waits on its empty live buffer (caught up), past ``cursor``."""
    client = sub._live
    with anyio.fail_after(10):
        while True:
            if (sub.cursor >= cursor and getattr(client, "waiter", None) is not None
                    and not getattr(client, "buf", None)):
                return
            await anyio.sleep(0.005)  # the follower's state is poll-only from outside


async def test_a_caught_up_follower_is_handed_plain_batches_directly(
    hub: Hub, event_log: EventLog
) -> None:
    """``deliver_directly`` (SSE's fast path): while a follower is caught up, the live path
    hands it the next events synchronously, ``types`` applied; a refused batch and
    ``session.ended`` go through ``batches()``. Together it sees every event exactly once, in
    order, and its cursor covers the filtered ones."""
    s = await event_log.create_session("echo")
    sid = s.session_id
    direct: list[int] = []
    via_batches: list[int] = []
    refuse = False

    def deliver(events: list[Event]) -> bool:
        assert events
        if refuse:
            return False
        direct.extend(e.seq for e in events)
        return True

    async with hub.subscribe(sid, after=0, types={"input", "session.ended"}) as sub:
        sub.deliver_directly(deliver)

        async def read() -> None:
            async for batch in sub.batches():
                assert not isinstance(batch, HistoryGone)
                via_batches.extend(e.seq for e in batch)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await _parked(sub)
                for seq in range(2, 7):  # one by one
                    await emit(event_log, sid, 1)
                    await _parked(sub, seq)
                assert direct == [2, 3, 4, 5, 6] and via_batches == []
                refuse = True
                await emit(event_log, sid, 3)  # 7..9: refused, so through batches()
                await _parked(sub, 9)
                refuse = False
                await event_log.signal(sid, "k", 1)  # 10: filtered out, the cursor covers it
                await _parked(sub, 10)
                await emit(event_log, sid, 2)  # 11, 12
                await event_log.end_session(sid)  # 13: ends it, through batches()
    assert set(direct) & set(via_batches) == set()
    assert direct == sorted(direct) and via_batches == sorted(via_batches)
    assert {7, 8, 9, 13} <= set(via_batches)
    assert sorted(direct + via_batches) == [*range(2, 10), 11, 12, 13]
    assert sub.cursor == 13


async def test_direct_batches_are_shared_whole_and_rounds_reported(
    hub: Hub, event_log: EventLog
) -> None:
    """Followers taking a fan-out's batch whole get the same list object (a transport frames
    it once for all of them); a filtered one gets its own list with just its types; each
    round of direct deliveries is followed by the ``after_fan_out`` callbacks."""
    s = await event_log.create_session("echo")
    sid = s.session_id
    got: dict[str, list[list[Event]]] = {"a": [], "b": [], "f": []}
    rounds: list[int] = []
    hub.after_fan_out(lambda: rounds.append(sum(len(v) for v in got.values())))

    def deliver_to(name: str) -> Callable[[list[Event]], bool]:
        def deliver(events: list[Event]) -> bool:
            got[name].append(events)
            return True
        return deliver

    async with (hub.subscribe(sid, after=0) as a, hub.subscribe(sid, after=0) as b,
                hub.subscribe(sid, after=0, types={"signal"}) as f):
        for name, sub in (("a", a), ("b", b), ("f", f)):
            sub.deliver_directly(deliver_to(name))

        async def read(sub: Subscription) -> None:
            async for _ in sub.batches():
                pass

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for sub in (a, b, f):
                    tg.start_soon(read, sub)
                for sub in (a, b, f):
                    await _parked(sub)
                cursor = a.cursor
                await emit(event_log, sid, 1)
                await event_log.signal(sid, "k", 1)
                for sub in (a, b, f):
                    await _parked(sub, cursor + 2)
                tg.cancel_scope.cancel()
    seqs = {name: [e.seq for batch in v for e in batch] for name, v in got.items()}
    assert seqs["a"] == seqs["b"] == [cursor + 1, cursor + 2]
    assert seqs["f"] == [cursor + 2]
    assert all(x is y for x, y in zip(got["a"], got["b"], strict=True))
    assert all(e.type == "signal" for batch in got["f"] for e in batch)
    assert rounds and rounds[-1] == sum(len(v) for v in got.values())


@pytest.mark.single_node  # on a cluster the hub follows sessions by pub/sub, not XREAD
async def test_the_live_xread_has_a_connection_of_its_own_and_gets_it_back(
    event_log: EventLog,
) -> None:
    """The live XREAD runs on one connection of the hub's own, named for its namespace in
    ``CLIENT LIST`` (not a pool checkout per call); killed, it is opened again and the live
    path goes on: a follower parked on it still gets every event, in order."""
    name = f"eventcore-hub-{event_log.keys.namespace}"

    async def live_conns(wanted: Callable[[int], bool] = lambda n: True
                         ) -> list[dict[str, object]]:
        """The hub's named connections, once their number is as ``wanted`` (polled: Redis's
        view of connections is known only by asking)."""
        while True:
            conns = [c for c in await event_log.redis.client_list() if c.get("name") == name]
            if wanted(len(conns)):
                return conns
            await anyio.sleep(0.01)

    s = await event_log.create_session("echo")
    sid = s.session_id
    seqs: list[int] = []
    async with Hub(event_log, live="xread", xread_block_ms=50) as hub, \
            hub.subscribe(sid, after=1) as sub:

        async def read() -> None:
            seqs.extend(await collect(sub, 4))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await _parked(sub)
                conns = await live_conns(lambda n: n > 0)  # its first XREAD is under way
                assert len(conns) == 1
                first = conns[0]["id"]
                await event_log.redis.execute_command("CLIENT", "KILL", "ID", first)
                await emit(event_log, sid, 3)
            assert seqs == [2, 3, 4]
            conns = await live_conns()  # (the one it blocks on now)
            assert len(conns) == 1 and conns[0]["id"] != first
    with anyio.fail_after(10):
        assert await live_conns(lambda n: n == 0) == []  # closed with the hub


async def test_the_live_xread_follows_streams_joining_and_leaving(event_log: EventLog) -> None:
    """The live XREAD's command is kept packed between calls (each stream with its cursor):
    as sessions are watched and unwatched in any order next to one watched throughout, every
    follower gets exactly its session's events, and the packed streams are those watched, in
    the order their cursors are packed (a stream read from another's cursor would skip or
    repeat events, which followers would then mend by reading pages: hidden from them)."""
    anchor = (await event_log.create_session("echo")).session_id
    sids = [(await event_log.create_session("echo")).session_id for _ in range(6)]
    last = dict.fromkeys([anchor, *sids], 1)  # session.created
    rounds = [sids[:3], sids[2:5], [sids[5], sids[0]], sids[::-1]]
    async with Hub(event_log, live="xread", xread_block_ms=50) as hub, \
            hub.subscribe(anchor, after=1) as anchored:
        anchor_seen: list[int] = []

        async def follow_anchor() -> None:
            async for batch in anchored.batches():
                assert not isinstance(batch, HistoryGone)
                anchor_seen.extend(e.seq for e in batch)

        async with anyio.create_task_group() as outer:
            outer.start_soon(follow_anchor)
            await _parked(anchored)

            def aligned() -> None:
                packed = hub._keys_packed
                if packed is not None:  # (None: packed again on the next call)
                    assert packed == b"".join(_bulk(k.encode()) for k in hub._ids)
                assert set(hub._ids) <= {w.stream for w in hub._watches.values()}
            for chosen in rounds:
                seen: dict[str, list[int]] = {sid: [] for sid in chosen}

                async def follow(sid: str, watching: anyio.Event, seen: list[int]) -> None:
                    async with hub.subscribe(sid, after=last[sid]) as sub:
                        watching.set()
                        seen.extend(await collect(sub, last[sid] + 4))
                        aligned()

                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        for sid in chosen:
                            watching = anyio.Event()
                            tg.start_soon(follow, sid, watching, seen[sid])
                            await watching.wait()
                            aligned()
                        for _ in range(4):
                            for sid in chosen:
                                await emit(event_log, sid, 1)
                        await emit(event_log, anchor, 1)
                    await _parked(anchored, last[anchor] + 1)
                assert seen == {sid: list(range(last[sid] + 1, last[sid] + 5))
                                for sid in chosen}
                for sid in chosen:
                    last[sid] += 4
                last[anchor] += 1
            outer.cancel_scope.cancel()
    assert anchor_seen == list(range(2, last[anchor] + 1))


async def test_pubsub_live_path_reads_every_note_of_one_message(event_log: EventLog) -> None:
    """One append script call notifies once for all its sessions (one note a line): no sweep
    to help (resync_s of an hour), each watched session of the batch is fetched live."""
    a = (await event_log.create_session("echo")).session_id
    shard = event_log.keys.shard_of(a)
    b = next(sid for sid in (f"hub{i}" for i in range(10_000))
             if event_log.keys.shard_of(sid) == shard)
    await event_log.create_session("echo", session_id=b)
    async with Hub(event_log, live="pubsub", resync_s=3600) as hub, \
            hub.subscribe(a, after=1) as sa, hub.subscribe(b, after=1) as sb:
        await event_log.append_many([Envelope(type="input", session_id=sid, payload={"i": i})
                                     for sid in (a, b) for i in range(2)])
        with anyio.fail_after(10):
            assert await collect(sa, 3) == [2, 3]
            assert await collect(sb, 3) == [2, 3]


@pytest.mark.single_node  # its tool is a plain client's PUBLISH
async def test_pubsub_live_path_skips_malformed_notes(event_log: EventLog) -> None:
    """Anything published on a notify channel that is not ``"<sid> <seq>"`` lines (another
    client of the same Redis, a foreign version) is skipped note by note: the hub goes on."""
    sid = (await event_log.create_session("echo")).session_id
    channel = event_log.keys.notify(event_log.keys.shard_of(sid))
    async with Hub(event_log, live="pubsub", resync_s=3600) as hub, \
            hub.subscribe(sid, after=1) as sub:
        for junk in (b"", b"garbage", f"{sid} x".encode(), f"{sid}\n\n{sid} -3".encode(),
                     b"\xff\xfe 1"):
            await event_log.redis.publish(channel, junk)
        notes = st.binary(max_size=40) | st.builds(
            lambda s, seq: f"{s} {seq}".encode(errors="surrogatepass"),
            st.sampled_from([sid, "", "x"]) | st.text(max_size=8), st.text(max_size=8))

        @settings(max_examples=300, deadline=None)
        @given(st.lists(notes, max_size=4).map(b"\n".join))
        def parse(message: bytes) -> None:  # the parser itself, fuzzed (no round trip each)
            hub._on_notify(message)

        parse()
        await event_log.append(Envelope(type="input", session_id=sid, payload={"i": 1}))
        with anyio.fail_after(10):
            assert await collect(sub, 2) == [2]
        assert hub.live_connected
