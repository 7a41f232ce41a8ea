"""The claim records ``session.started`` itself: byte for byte what the append script writes,
deduplicated on re-hosting, and appended by the handler's task when the claim leaves it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
from workers_support import eventually, watching

from eventcore import Envelope, EventLog
from eventcore.testing.invariants import check_log, read_all
from eventcore.workers import App, Session, Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


def _app(name: str) -> App:
    app = App()

    @app.agent(name)
    async def wait(session: Session) -> None:
        async for _ in session.inputs():
            await session.emit("message", "got it")

    return app


async def _entry(log: EventLog, stream: str, seq: int) -> dict[bytes, bytes]:
    got = await log.redis.xrange(stream, f"0-{seq}", f"0-{seq}")
    assert len(got) == 1
    fields: dict[bytes, bytes] = got[0][1]
    return fields


async def _feed_entry(log: EventLog, sid: str, seq: int) -> dict[bytes, bytes]:
    shard = log.keys.shard_of(sid)
    for _, fields in await log.redis.xrange(log.keys.feed(shard)):
        if fields[b"sid"] == sid.encode() and fields[b"seq"] == str(seq).encode():
            return dict(fields)
    raise AssertionError(f"no feed entry {sid} {seq}")


async def test_claim_writes_session_started_like_the_append_script(
        event_log: EventLog, hosting: Hosting) -> None:
    log = event_log
    agent = "quiet-agent_1.x:y/z"
    async with hosting(log, _app(agent), idle_timeout_s=0.3) as w, watching(log) as feed:
        s = await log.create_session(agent)
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "session.started") == 1)
        started = feed.of(sid, "session.started")[0]
        assert started.seq == 2 and started.payload == {"agent": agent}
        assert started.event_key == "session.started"
        # a twin whose session.started goes through the append script, with the same ts
        twin = await log.create_session()
        tid = twin.session_id
        assert len(tid) == len(sid)
        res = await log.append(Envelope(type="session.started", session_id=tid,
                                        payload={"agent": agent}, event_key="session.started",
                                        ts=started.ts))
        assert res.seq == 2 and not res.duplicate
        keys, tkeys = log.keys.session(sid), log.keys.session(tid)
        mine, theirs = await _entry(log, keys.stream, 2), await _entry(log, tkeys.stream, 2)
        assert mine[b"inc"] == s.incarnation.encode()  # each session's own incarnation
        theirs[b"inc"] = mine[b"inc"]
        assert mine == {k: v.replace(tid.encode(), sid.encode()) for k, v in theirs.items()}
        fmine, ftheirs = await _feed_entry(log, sid, 2), await _feed_entry(log, tid, 2)
        assert fmine[b"inc"] == s.incarnation.encode()  # each session's own incarnation
        ftheirs[b"inc"] = fmine[b"inc"]
        assert fmine == {k: v.replace(tid.encode(), sid.encode()) for k, v in ftheirs.items()}
        assert await log.redis.hgetall(keys.dedupe) == await log.redis.hgetall(tkeys.dedupe)
        assert await log.redis.hget(keys.dedupe, "session.started") == b"2"
        meta = await log.redis.hmget(keys.meta, "seq", "updated_at")
        assert meta[0] == b"2" and meta[1] is not None
        # idle: unloaded; an input hosts it again, and session.started is not recorded twice
        await eventually(lambda: w.metrics.unloaded == 1)
        await log.append(Envelope(type="input", session_id=sid, payload="hi"))
        await feed.until(lambda: feed.count(sid, "message") == 1)
    assert w.metrics.claims == 2
    events = await read_all(log, sid)
    check_log(events)
    assert [e.type for e in events] == [
        "session.created", "session.started", "input", "message"]
    assert (await log.get_session(sid)).epoch == 2


async def test_an_agent_name_json_must_escape_is_started_by_an_append(
        event_log: EventLog, hosting: Hosting) -> None:
    log = event_log
    agent = 'we"ird\\agent é'
    async with hosting(log, _app(agent)) as w, watching(log) as feed:
        s = await log.create_session(agent)
        await feed.until(lambda: feed.count(s.session_id, "session.started") == 1)
        await log.append(Envelope(type="input", session_id=s.session_id, payload="hi"))
        await feed.until(lambda: feed.count(s.session_id, "message") == 1)
        assert w.metrics.claims == 1
    events = await read_all(log, s.session_id)
    check_log(events)
    assert [e.type for e in events][:2] == ["session.created", "session.started"]
    assert events[1].payload == {"agent": agent} and events[1].event_key == "session.started"
    assert events.count(events[1]) == 1


async def test_a_claim_replayed_after_a_lost_reply_does_not_record_twice(
        event_log: EventLog, hosting: Hosting) -> None:
    log = event_log
    async with hosting(log, _app("quiet")) as w, watching(log) as feed:
        s = await log.create_session("quiet")
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "session.started") == 1)
        # what a resend of the claim (its reply lost) does: the same entry, claimed again
        shard = log.keys.shard_of(sid)
        pending = await log.redis.xpending_range(log.keys.dispatch(shard), "workers", "-", "+", 10)
        assert len(pending) == 1
        with anyio.fail_after(10):
            await w._claim([(shard, pending[0]["message_id"].decode(), {b"sid": sid.encode()})],
                           reclaimed=True)
        await log.append(Envelope(type="input", session_id=sid, payload="hi"))
        await feed.until(lambda: feed.count(sid, "message") >= 1)
    events = await read_all(log, sid)
    check_log(events)
    assert [e.type for e in events].count("session.started") == 1
    assert (await log.get_session(sid)).epoch == 2


async def test_claim_started_carries_the_generation_after_a_divergence(
        event_log: EventLog, hosting: Hosting) -> None:
    """A session whose stream changed generation (a failover lost writes): the session.started
    the claim writes carries 'g' like every entry the append script writes after it."""
    from eventcore._codec import entry_generation

    log = event_log
    agent = "gen-agent"
    s = await log.create_session(agent)
    sid = s.session_id
    shard = log.keys.shard_of(sid)
    # a "failover": the shard's write counter went back; the next append bumps the generation
    await log.redis.hset(log.keys.epoch(shard), "wc", 0)
    r = await log.emit(sid, "m", "new")
    gen, _ = entry_generation(await _entry(log, log.keys.session(sid).stream, r.seq))
    assert gen != ""
    async with hosting(log, _app(agent), idle_timeout_s=0.3), watching(log) as feed:
        await feed.until(lambda: feed.count(sid, "session.started") == 1)
        started = feed.of(sid, "session.started")[0]
        fields = await _entry(log, log.keys.session(sid).stream, started.seq)
        assert entry_generation(fields)[0] == gen
