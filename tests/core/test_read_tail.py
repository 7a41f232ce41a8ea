"""Read and tail: cursors, filters, the catch-up/live seam, stopping at session.ended."""

from __future__ import annotations

import anyio
import pytest

from eventcore import Envelope, EventLog, SessionNotFound, ValidationError
from eventcore.testing.invariants import assert_replay_suffixes, check_log


async def test_read_cursor_limit_and_types(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    await event_log.append_many(
        [Envelope(type="message" if i % 2 else "log", session_id=sid, payload=i)
         for i in range(10)]
    )
    assert [e.seq for e in await event_log.read(sid, 3, 4)] == [4, 5, 6, 7]
    assert await event_log.read(sid, 11) == []
    assert await event_log.read(sid, 500) == []
    msgs = await event_log.read(sid, 0, 100, types={"message"})
    assert [e.payload for e in msgs] == [1, 3, 5, 7, 9]
    await assert_replay_suffixes(event_log, sid)
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValidationError):
            await event_log.read(sid, bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await event_log.read(sid, 0, 0)


async def test_tail_seam_is_exact_under_concurrent_appends(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    await event_log.append_many([Envelope(type="m", session_id=sid, payload=i) for i in range(30)])
    producers, per = 8, 40
    total = 31 + producers * per + 1
    seen: list[int] = []
    started = anyio.Event()

    async def follow(after: int) -> None:
        # small pages: the follower crosses the catch-up/live seam many times
        async for env in event_log.tail(sid, after, batch=7, block_ms=200):
            seen.append(env.seq)
            if env.seq == after + 5:
                started.set()

    async def produce(p: int) -> None:
        for i in range(per):
            await event_log.emit(sid, "m", {"p": p, "i": i})

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow, 3)
        await started.wait()
        async with anyio.create_task_group() as writers:
            for p in range(producers):
                writers.start_soon(produce, p)
        await event_log.end_session(sid)
    # the follower stopped by itself at session.ended, having seen every seq after 3 once
    assert seen == list(range(4, total + 1))
    full = await assert_replay_suffixes(event_log, sid, points=[0, 3, 17, total - 1, total])
    check_log(full)


async def test_tail_from_any_cursor(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    await event_log.append_many([Envelope(type="m", session_id=sid, payload=i) for i in range(12)])
    await event_log.end_session(sid)
    for after in (0, 1, 6, 12, 13):
        got = [e.seq async for e in event_log.tail(sid, after, batch=5)]
        assert got == list(range(after + 1, 15))
    # until_ended=False keeps following after the end (here: until we stop reading)
    got = []
    async for env in event_log.tail(sid, 10, until_ended=False, block_ms=50):
        got.append(env.seq)
        if env.seq == 14:
            break
    assert got == [11, 12, 13, 14]


async def test_tail_waits_for_live_events(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    seen: list[str] = []

    async def follow() -> None:
        async for env in event_log.tail(sid, 1, block_ms=100):
            seen.append(env.type)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await event_log.emit(sid, "message", "a")
        await event_log.emit(sid, "message", "b")
        await event_log.end_session(sid)
    assert seen == ["message", "message", "session.ended"]


async def test_hostile_ids_on_read_paths(event_log: EventLog) -> None:
    for bad in ("", "a b", "{x}", "a/b", "x" * 200, "\x00"):
        with pytest.raises(ValidationError):
            await event_log.read(bad)
        with pytest.raises(ValidationError):
            await anext(aiter(event_log.tail(bad)))
        with pytest.raises(ValidationError):
            await event_log.last_seq(bad)


@pytest.mark.parametrize("new_events", [0, 12])
async def test_tail_ends_at_the_delete_and_never_crosses_into_the_session_created_again(
    event_log: EventLog, new_events: int
) -> None:
    """Deleted and created again under its id, a session is another one (seqs restart at 1):
    the follower ends with SessionNotFound, whether the new session outgrows its cursor (the
    live read sees the new incarnation's entries) or stays below it (a page read notices)."""
    sid = (await event_log.create_session()).session_id
    await event_log.append_many([Envelope(type="m", session_id=sid, payload="old")
                                 for _ in range(3)])
    got: list[Envelope] = []
    reached = anyio.Event()

    async def follow() -> None:
        with pytest.raises(SessionNotFound):
            async for env in event_log.tail(sid, 0, until_ended=False, block_ms=100):
                got.append(env)
                if env.seq == 4:
                    reached.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await reached.wait()
            assert await event_log.delete_session(sid)
            await event_log.create_session(session_id=sid)
            if new_events:
                await event_log.append_many([Envelope(type="m", session_id=sid, payload="new")
                                             for _ in range(new_events)])
    assert [e.payload for e in got if e.type == "m"] == ["old"] * 3
    assert [e.seq for e in got] == list(range(1, len(got) + 1))


async def test_tail_follows_one_incarnation(event_log: EventLog) -> None:
    sid = (await event_log.create_session()).session_id
    old = (await event_log.get_session(sid)).incarnation
    with pytest.raises(SessionNotFound):
        await anext(aiter(event_log.tail(sid + "-never")))  # no such session
    await event_log.delete_session(sid)
    again = await event_log.create_session(session_id=sid)
    with pytest.raises(SessionNotFound):  # the one it was told to follow is gone
        await anext(aiter(event_log.tail(sid, incarnation=old)))
    first = await anext(aiter(event_log.tail(sid, incarnation=again.incarnation)))
    assert (first.seq, first.type) == (1, "session.created")
