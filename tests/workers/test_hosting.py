"""Hosting sessions in-process against a real Redis: the programming model and lifecycle."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from workers_support import ended_reason, eventually, watching

from eventcore import Envelope, EventLog, decode_payload
from eventcore.errors import StaleHost
from eventcore.testing.invariants import check_log, read_all
from eventcore.workers import App, Session, Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


async def pending(log: EventLog) -> int:
    total = 0
    for shard in log.keys.all_shards():
        info = await log.redis.xpending(log.keys.dispatch(shard), "workers")
        total += info["pending"]
    return total


async def test_echo_runs_tools_signals_and_emits(event_log: EventLog, hosting: Hosting) -> None:
    log = event_log
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("echo", input="hello")
        await log.append(Envelope(type="input", session_id=s.session_id, payload="again"))
        await feed.until(lambda: feed.count(s.session_id, "run.completed") == 2)
        events = await read_all(log, s.session_id)
        check_log(events)
        types = [e.type for e in events if e.type != "input"]
        assert types[:2] == ["session.created", "session.started"]
        for run_id in {e.run_id for e in events if e.run_id}:
            assert [e.type for e in events if e.run_id == run_id] == [
                "run.started", "tool.started", "effect", "tool.ended", "message", "progress",
                "run.completed"]
        assert types.count("signal") == 2
        messages = [e.payload["text"] for e in events if e.type == "message"]
        assert messages == ["HELLO", "AGAIN"]
        runs = {e.run_id for e in events if e.type == "run.started"}
        assert len(runs) == 2
        tool_end = next(e for e in events if e.type == "tool.ended")
        assert decode_payload(tool_end).result == "HELLO"
        assert (await log.effects(s.session_id)).keys() == {
            f"{r}/tool:upper:1" for r in runs}
        info = await log.get_session(s.session_id)
        assert info.state == "active" and info.host == w.id and info.epoch == 1
        assert w.metrics.claims == 1 and w.metrics.active == 1 and w.metrics.load == 1 / 50


async def test_returning_handler_ends_the_session_and_acks(event_log: EventLog,
                                                          hosting: Hosting) -> None:
    log = event_log
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("once")
        await feed.until(lambda: feed.count(s.session_id, "session.ended") == 1)
        await eventually(lambda: w.metrics.completed == 1)
        ended = feed.of(s.session_id, "session.ended")[0]
        assert ended_reason(ended) == "completed"
        assert (await log.get_session(s.session_id)).state == "ended"
        assert await pending(log) == 0
        await eventually(lambda: w.metrics.active == 0)
        check_log(await read_all(log, s.session_id))


async def test_idle_session_unloads_and_the_next_input_rehosts_it(
    event_log: EventLog, hosting: Hosting
) -> None:
    log = event_log
    async with hosting(log, idle_timeout_s=0.3) as w, watching(log) as feed:
        s = await log.create_session("echo", input="one")
        await feed.until(lambda: feed.count(s.session_id, "run.completed") == 1)

        async def idle() -> bool:
            # the worker counts the unload when the release script answers, which can be
            # just after Redis already shows the state: wait for both
            return (await log.get_session(s.session_id)).state == "idle" and (
                w.metrics.unloaded >= 1)

        await eventually(idle)
        assert w.metrics.unloaded == 1 and await pending(log) == 0
        raw = await log.redis.hget(log.keys.session(s.session_id).meta, "dispatched")
        assert raw is None
        # the next input's append re-dispatches it; the handler replays from the start
        await log.append(Envelope(type="input", session_id=s.session_id, payload="two"))
        await feed.until(lambda: feed.count(s.session_id, "run.completed") == 2)
        events = await read_all(log, s.session_id)
        check_log(events)
        assert [e.payload["text"] for e in events if e.type == "message"] == ["ONE", "TWO"]
        assert [e.type for e in events].count("tool.started") == 2
        assert (await log.get_session(s.session_id)).epoch == 2
        assert w.metrics.claims == 2


async def test_cancel_a_run_then_the_session(event_log: EventLog, hosting: Hosting) -> None:
    from eventcore.workers import cancel

    log = event_log
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("waiter", input="first")
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "message") == 1)
        run_id = feed.of(sid, "run.started")[0].run_id
        await cancel(log, sid, run_id=run_id)
        await feed.until(lambda: feed.count(sid, "message") == 2)
        assert feed.of(sid, "message")[1].payload == {"after": "first", "cancelled": True}
        assert [e.run_id for e in feed.of(sid, "run.cancelled")] == [run_id]
        # the session goes on: a new input starts a new run
        await log.append(Envelope(type="input", session_id=sid, payload="second"))
        await feed.until(lambda: feed.count(sid, "run.started") == 2)
        await feed.until(lambda: feed.count(sid, "message") == 3)
        second = feed.of(sid, "run.started")[1].run_id
        await cancel(log, sid)
        await feed.until(lambda: feed.count(sid, "session.ended") == 1)
        assert [e.run_id for e in feed.of(sid, "run.cancelled")] == [run_id, second]
        assert ended_reason(feed.of(sid, "session.ended")[0]) == "cancelled"
        await eventually(lambda: w.metrics.cancelled == 1)
        assert await pending(log) == 0
        check_log(await read_all(log, sid))


async def test_cancel_of_an_unhosted_idle_session_ends_it(event_log: EventLog,
                                                         hosting: Hosting) -> None:
    from eventcore.workers import cancel

    log = event_log
    async with hosting(log, idle_timeout_s=0.2), watching(log) as feed:
        s = await log.create_session("echo", input="x")
        await feed.until(lambda: feed.count(s.session_id, "run.completed") == 1)

        async def idle() -> bool:
            return (await log.get_session(s.session_id)).state == "idle"

        await eventually(idle)
    await cancel(log, s.session_id)
    info = await log.get_session(s.session_id)
    assert info.state == "ended"
    events = await read_all(log, s.session_id)
    assert ended_reason(events[-1]) == "cancelled"
    check_log(events)


async def test_run_timeout_is_recorded_retried_then_dead_lettered(
    event_log: EventLog, hosting: Hosting
) -> None:
    from eventcore.workers import dead_letters

    log = event_log
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("slow", labels={"run_timeout": "0.1"})
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "session.ended") == 1)
        timed_out = feed.of(sid, "run.timed_out")
        assert [e.event_key.rsplit("@", 1)[1] for e in timed_out] == ["1", "2"]
        assert {decode_payload(e).error.type for e in timed_out} == {"RunTimedOut"}
        ended = decode_payload(feed.of(sid, "session.ended")[0])
        assert ended.reason == "failed"
        assert ended.error.type == "RunTimedOut" and ended.error.retryable is True
        await eventually(lambda: w.metrics.dead_lettered == 1)
        assert w.metrics.retries == 1
        (dead,) = [d for d in await dead_letters(log) if d.session_id == sid]
        assert dead.attempts == 2 and dead.agent == "slow"
        assert dead.error.type == "RunTimedOut"
        check_log(await read_all(log, sid))
        # one record shape: a kind, shared with the subscribers' records
        raw = [f for _, f in await log.redis.xrange(log.keys.dead(log.keys.shard_of(sid)))]
        assert [f[b"kind"] for f in raw if f.get(b"sid") == sid.encode()] == [b"session"]


async def test_dead_letters_reads_records_written_before_they_had_a_kind(
    event_log: EventLog,
) -> None:
    from eventcore.workers import dead_letters

    log = event_log
    dead = log.keys.dead(0)
    error = b'{"type":"CrashLoop","message":"kept dying","retryable":false}'
    # the worker's record as it was written before records carried a kind
    await log.redis.xadd(dead, {"sid": "old-1", "agent": "a", "attempts": "2", "error": error,
                                "worker": "w-old", "at": "1700000000000", "entry": "3-0"})
    # a subscriber's record (in the same stream): not a dead session
    await log.redis.xadd(dead, {"kind": "subscriber", "group": "audit", "consumer": "c",
                                "feed": log.keys.feed(0), "entry": "4-0", "deliveries": "4",
                                "error": error, "f.sid": "x", "f.seq": "1"})
    (old,) = await dead_letters(log)
    assert (old.session_id, old.agent, old.attempts, old.worker, old.at_ms) == (
        "old-1", "a", 2, "w-old", 1700000000000)
    assert old.error.type == "CrashLoop" and old.error.retryable is False


async def test_session_timeout_times_out_the_run_and_ends(event_log: EventLog,
                                                         hosting: Hosting) -> None:
    log = event_log
    async with hosting(log, session_timeout_s=0.5) as w, watching(log) as feed:
        s = await log.create_session("waiter", input="x")
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "session.ended") == 1)
        (timed_out,) = feed.of(sid, "run.timed_out")
        assert decode_payload(timed_out).error.type == "SessionTimedOut"
        ended = decode_payload(feed.of(sid, "session.ended")[0])
        assert ended.reason == "timed_out" and ended.error.retryable is False
        await eventually(lambda: w.metrics.timed_out == 1)
        assert w.metrics.retries == 0
        check_log(await read_all(log, sid))


async def test_failures_are_retried_with_backoff_until_success(
    event_log: EventLog, hosting: Hosting
) -> None:
    log = event_log
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("flaky", labels={"fail_until": "3"}, input="go")
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "session.ended") == 1)
        events = await read_all(log, sid)
        check_log(events)
        failed = [e for e in events if e.type == "run.failed"]
        assert [e.event_key.rsplit("@", 1)[1] for e in failed] == ["1", "2"]
        assert decode_payload(failed[0]).error.message == "attempt 1 failed"
        assert [e.payload for e in events if e.type == "message"] == [
            {"text": "go", "attempt": 3}]
        assert ended_reason(events[-1]) == "completed"
        # one run id across attempts: started once (deduplicated), failed twice, completed
        assert len({e.run_id for e in events if e.type.startswith("run.")}) == 1
        assert w.metrics.retries == 2 and w.metrics.dead_lettered == 0
        assert (await log.get_session(sid)).epoch == 3


async def test_exhausted_retries_dead_letter_with_a_structured_error(
    event_log: EventLog, hosting: Hosting
) -> None:
    from eventcore.workers import dead_letters

    log = event_log
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("flaky", labels={"fail_until": "99"}, input="go")
        t = await log.create_session("terminal")
        await feed.until(lambda: feed.count(s.session_id, "session.ended") == 1
                         and feed.count(t.session_id, "session.ended") == 1)
        await eventually(lambda: w.metrics.dead_lettered == 2)
        assert w.metrics.retries == 2  # the terminal error is never retried
        by_sid = {d.session_id: d for d in await dead_letters(log)}
        flaky, terminal = by_sid[s.session_id], by_sid[t.session_id]
        assert (flaky.attempts, flaky.error.type, flaky.error.retryable) == (
            3, "ValueError", True)
        assert flaky.error.message == "attempt 3 failed"
        assert (terminal.attempts, terminal.error.type, terminal.error.retryable) == (
            1, "TerminalError", False)
        for sid in (s.session_id, t.session_id):
            end = decode_payload((await read_all(log, sid))[-1])
            assert end.reason == "failed" and end.error == by_sid[sid].error
        assert await pending(log) == 0


async def test_unknown_agent_is_dead_lettered(event_log: EventLog, hosting: Hosting) -> None:
    from eventcore.workers import dead_letters

    log = event_log
    async with hosting(log), watching(log) as feed:
        s = await log.create_session("nobody-registers-this")
        await feed.until(lambda: feed.count(s.session_id, "session.ended") == 1)
        (dead,) = [d for d in await dead_letters(log) if d.session_id == s.session_id]
        assert dead.error.type == "NoSuchAgent" and dead.error.retryable is False


async def test_backpressure_never_exceeds_max_concurrent_sessions(
    event_log: EventLog, hosting: Hosting
) -> None:
    import worker_apps

    log = event_log
    async with hosting(log, concurrency=3) as w, watching(log) as feed:
        sids = [(await log.create_session("held")).session_id for _ in range(10)]
        await feed.until(lambda: sum(feed.count(x, "session.started") for x in sids) == 3)
        assert w.metrics.active == 3 and w.metrics.load == 1.0

        async def three_pending() -> bool:  # a full worker gives back what it read beyond
            return await pending(log) == 3

        await eventually(three_pending)
        states = [(await log.get_session(x)).state for x in sids]
        assert states.count("active") == 3 and states.count("created") == 7
        # finish sessions one input at a time; the rest flow in, never more than 3 at once
        done: set[str] = set()

        def hosted() -> list[str]:
            return [x for x in sids if feed.count(x, "session.started") and x not in done]

        while len(done) < 10:
            await feed.until(lambda: bool(hosted()))
            for x in hosted():
                await log.append(Envelope(type="input", session_id=x, payload="go"))
                done.add(x)
            await feed.until(lambda: all(feed.count(x, "session.ended") for x in done))
        assert worker_apps.state["peak"] == 3
        await eventually(lambda: w.metrics.completed == 10)


async def test_burst_mode_returns_when_nothing_is_left(event_log: EventLog) -> None:
    import worker_apps

    log = event_log
    sids = [(await log.create_session("once")).session_id for _ in range(20)]
    retried = (await log.create_session("flaky", labels={"fail_until": "2"}, input="x"))
    w = Worker(worker_apps.app, log, concurrency=8, lease_ttl_s=2, block_ms=100)
    with anyio.fail_after(30):
        await w.run_burst()
    for sid in [*sids, retried.session_id]:
        assert (await log.get_session(sid)).state == "ended"
    assert w.metrics.completed == 21 and w.metrics.retries == 1
    assert await pending(log) == 0


async def test_ended_from_outside_stops_the_handler(event_log: EventLog,
                                                   hosting: Hosting) -> None:
    log = event_log
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("waiter", input="x")
        await feed.until(lambda: feed.count(s.session_id, "message") == 1)
        await log.end_session(s.session_id, "deleted")
        await eventually(lambda: w.metrics.active == 0)
        assert await pending(log) == 0
        events = await read_all(log, s.session_id)
        check_log(events)
        assert events[-1].type == "session.ended" and ended_reason(events[-1]) == "deleted"


async def test_burst_is_not_done_while_a_dispatch_entry_is_undelivered(
    event_log: EventLog,
) -> None:
    """Burst mode ends only once the dispatch streams hold nothing the workers' group has not
    been given: a retry moved from the delayed set onto a stream after the last empty read
    (the maintenance loop's move) is still there to host."""
    from eventcore.workers._scripts import GROUP

    log = event_log
    w = Worker(App(), log, concurrency=1)
    assert await w._burst_done()  # nothing anywhere
    s = await log.create_session("nobody")  # its dispatch entry: no read has taken it
    assert not await w._burst_done()
    stream = log.keys.dispatch(log.keys.session(s.session_id).shard)
    redis: Any = log.redis
    await redis.xgroup_create(stream, GROUP, id="0")
    assert len((await redis.xreadgroup(GROUP, "c1", {stream: ">"}))[0][1]) == 1
    assert await w._burst_done()  # given to the group (whether acknowledged is the host's)


async def test_a_superseded_host_is_fenced_and_stops(event_log: EventLog) -> None:
    """Another host took the session over (its epoch moved on): this host's next write is
    refused with StaleHost, and it stops hosting without acknowledging anything."""
    app = App()
    release = anyio.Event()
    seen: list[BaseException] = []

    @app.agent("fenced")
    async def fenced(session: Session) -> None:
        await release.wait()
        try:
            await session.emit("message", "late")
        except StaleHost as exc:
            seen.append(exc)
            raise

    log = event_log
    # a lease renewal would find the new epoch too and stop the host before its write: a
    # long TTL keeps renewals (every TTL/3) out of this test's second, so the write meets it
    w = Worker(app, log, concurrency=5, lease_ttl_s=30, block_ms=100)
    async with anyio.create_task_group() as tg:
        await tg.start(w.run)
        # the heartbeat's first beat comes once its own client has connected (a cluster
        # client, on a loaded machine, can take past the claim): the next is TTL/3 away
        await eventually(lambda: w.metrics.heartbeats >= 1)
        async with watching(log) as feed:
            s = await log.create_session("fenced")
            await feed.until(lambda: feed.count(s.session_id, "session.started") == 1)
            meta = log.keys.session(s.session_id).meta
            await log.redis.hincrby(meta, "epoch", 1)  # what a new host's claim does
            release.set()
            await eventually(lambda: w.metrics.active == 0)
        await w.aclose()
    assert len(seen) == 1 and seen[0].current == 2
    assert w.metrics.fenced_writes == 1 and w.metrics.lost == 1
    assert w.metrics.completed == 0
    assert await pending(log) == 1  # the entry is the new host's to acknowledge
    events = await read_all(log, s.session_id)
    assert [e.type for e in events] == ["session.created", "session.started"]


async def test_hostile_dispatch_entries_are_dropped(event_log: EventLog,
                                                   hosting: Hosting) -> None:
    log = event_log
    d = log.keys.dispatch(0)
    await log.redis.xadd(d, {"sid": "../../etc/passwd"})
    await log.redis.xadd(d, {"nothing": "here"})
    await log.redis.xadd(d, {"sid": "never-created"})
    async with hosting(log) as w, watching(log) as feed:
        s = await log.create_session("once")
        await feed.until(lambda: feed.count(s.session_id, "session.ended") == 1)
        await eventually(lambda: w.metrics.active == 0)
        assert await pending(log) == 0
        assert w.metrics.claims == 1


async def test_a_dispatch_entry_on_another_shard_than_its_session_is_dropped(
    event_log: EventLog, hosting: Hosting, caplog: pytest.LogCaptureFixture
) -> None:
    """A planted entry on shard A naming a real session of shard B is acked and logged, never
    claimed: claiming it would run one script over two shards' keys (CROSSSLOT on a cluster;
    on one node its session.started would go to shard A's feed). The session's own entry
    hosts it once, as ever."""
    log = event_log
    s = await log.create_session("once")
    home = log.keys.shard_of(s.session_id)
    other = (home + 1) % log.keys.shards
    await log.redis.xadd(log.keys.dispatch(other), {"sid": s.session_id})
    async with hosting(log) as w, watching(log) as feed:
        await feed.until(lambda: feed.count(s.session_id, "session.ended") == 1)
        await eventually(lambda: w.metrics.active == 0)
        await eventually(lambda: any("names session" in r.getMessage() for r in caplog.records))
        assert await pending(log) == 0
        assert w.metrics.claims == 1
    assert feed.count(s.session_id, "session.started") == 1
    wrong = await log.redis.xrange(log.keys.feed(other))
    assert not [f for _, f in wrong if s.session_id.encode() in b"".join(f.values())]


@pytest.mark.parametrize("type", ["input", "session.ended", "control.cancel", "run.started"])
async def test_reserved_types_cannot_be_emitted(event_log: EventLog, type: str) -> None:
    app = App()
    errors: list[Exception] = []

    @app.agent("emitter")
    async def emitter(session: Session) -> None:
        try:
            await session.emit(type, {})
        except ValueError as exc:
            errors.append(exc)

    s = await event_log.create_session("emitter")
    await Worker(app, event_log, lease_ttl_s=2, block_ms=50).run_burst()
    assert len(errors) == 1 and "reserved" in str(errors[0])
    assert [e.type for e in await read_all(event_log, s.session_id)] == [
        "session.created", "session.started", "session.ended"]


def _labels(**kw: Any) -> dict[str, str]:
    return {k: str(v) for k, v in kw.items()}


async def test_acknowledged_dispatch_entries_are_trimmed(event_log: EventLog,
                                                         hosting: Hosting) -> None:
    log = event_log
    keys = log.keys

    async def lengths() -> int:
        return sum([await log.redis.xlen(keys.dispatch(s)) for s in keys.all_shards()])

    async with hosting(log, trim_interval_s=0.05) as w, watching(log) as feed:
        sids = [(await log.create_session("once")).session_id for _ in range(20)]
        held = await log.create_session("held")  # stays pending: must survive the trim
        await feed.until(lambda: all(feed.count(s, "session.ended") for s in sids))
        await eventually(lambda: w.metrics.completed == 20)

        async def trimmed() -> bool:  # at most the last delivered entry of each shard
            return await lengths() <= keys.shards

        await eventually(trimmed)
        assert await pending(log) == 1
        await log.append(Envelope(type="input", session_id=held.session_id, payload="go"))
        await feed.until(lambda: feed.count(held.session_id, "session.ended") == 1)


async def test_workers_register_while_running(event_log: EventLog, hosting: Hosting) -> None:
    log = event_log
    async with hosting(log, concurrency=7) as w:
        async def registered() -> bool:
            return bool(await log.redis.hgetall(log.keys.worker(w.id)))

        await eventually(registered)
        record = await log.redis.hgetall(log.keys.worker(w.id))
        assert record[b"max"] == b"7" and record[b"state"] == b"running"
        assert float(record[b"load"]) == 0.0
        assert await log.redis.zscore(log.keys.workers(), w.id) is not None
    assert not await log.redis.exists(log.keys.worker(w.id))
    assert await log.redis.zscore(log.keys.workers(), w.id) is None


@pytest.mark.single_node  # its tool is a plain client's PUBLISH
async def test_junk_on_the_wake_channel_is_skipped(event_log: EventLog, hosting: Hosting) -> None:
    """Anything published on a wake channel that is not ``"<sid> <seq>"`` (another client of
    the same Redis) is skipped: the feed goes on waking its sessions (the poll an hour away)."""
    log = event_log
    async with hosting(log, poll_interval_s=3600.0) as w, watching(log) as feed:
        s = await log.create_session("echo", input="hello")
        await feed.until(lambda: feed.count(s.session_id, "run.completed") == 1)
        channel = log.keys.wake(log.keys.shard_of(s.session_id))
        for junk in (b"", b"garbage", f"{s.session_id} x".encode(),
                     f"{s.session_id} \xb2".encode(), b"\xff\xfe 1"):
            await log.redis.publish(channel, junk)
        notes = st.binary(max_size=40) | st.builds(
            lambda sid, seq: f"{sid} {seq}".encode(errors="surrogatepass"),
            st.sampled_from([s.session_id, ""]) | st.text(max_size=8), st.text(max_size=8))

        @settings(max_examples=300, deadline=None)
        @given(notes)
        def parse(note: bytes) -> None:  # the parser itself, fuzzed (no round trip each)
            w.feed._notified(note)

        parse()
        await log.append(Envelope(type="input", session_id=s.session_id, payload="again"))
        await feed.until(lambda: feed.count(s.session_id, "run.completed") == 2)
        assert w.active == 1  # still hosted: the feed did not fail
