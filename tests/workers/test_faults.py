"""Fault tests with real worker processes (``eventcore worker``) on a real Redis: SIGKILL,
SIGSTOP (a partition), drain, a flood, a blocked event loop, Redis going away."""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from workers_support import SAFETY_S, WorkerProc, eventually, watching

from eventcore import Envelope, EventLog, decode_payload, load_settings
from eventcore.errors import StaleHost
from eventcore.testing._server import RedisServer, free_port
from eventcore.testing.invariants import check_log, read_all
from eventcore.workers import Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("eventcore_worker")}


def effect_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def create(log: EventLog, n: int) -> list[str]:
    return [(await log.create_session("echo", input=f"first-{i}")).session_id
            for i in range(n)]


async def test_sigkill_mid_run_another_worker_recovers_every_session(
    event_log: EventLog, tmp_path: Path
) -> None:
    log, n, ttl = event_log, 30, 1.5
    effects = tmp_path / "effects"
    a = WorkerProc(log, "--lease-ttl", str(ttl),
                   env={"EC_TEST_EFFECTS": str(effects), "EC_TEST_HOLD_S": "600"}).start()
    b = WorkerProc(log, "--lease-ttl", str(ttl), env={"EC_TEST_EFFECTS": str(effects)})
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            # every session is mid-run: its tool ran and was recorded, it replied, it holds
            await feed.until(lambda: all(feed.count(s, "message") == 1 for s in sids))
            assert len(effect_lines(effects)) == n
            await b.start().ready()
            for i, sid in enumerate(sids):  # inputs waiting in the stream, unread by A
                await log.append(Envelope(type="input", session_id=sid,
                                          payload=f"second-{i}"))
            killed_at = time.time()
            a.kill()
            await feed.until(lambda: all(feed.count(s, "run.completed") == 2 for s in sids))
        for i, sid in enumerate(sids):
            events = await read_all(log, sid)
            check_log(events)  # gap-free seq, each event key once
            assert [e.payload for e in events if e.type == "input"] == [
                f"first-{i}", f"second-{i}"]
            assert [e.payload["text"] for e in events if e.type == "message"] == [
                f"FIRST-{i}", f"SECOND-{i}"]
            assert [e.type for e in events].count("tool.ended") == 2
            assert {e.payload["pid"] for e in events if e.type == "progress"} == {b.pid}
            info = await log.get_session(sid)
            assert (info.host, info.epoch) == (b.id, 2)
            # recovered by B within the lease TTL plus a (generous) safety margin
            first_by_b = min(e.ts.timestamp() for e in events if e.type == "progress")
            assert first_by_b - killed_at < ttl + 10
        lines = effect_lines(effects)
        counts = collections.Counter(lines)
        assert len(counts) == 2 * n and set(counts.values()) == {1}, counts.most_common(3)
        final = await b.stop()
        assert final["reclaims"] == n and final["claims"] == n
    finally:
        a.kill()
        b.kill()


async def test_sigstop_past_the_lease_its_writes_are_refused_and_it_stops(
    event_log: EventLog, tmp_path: Path
) -> None:
    log, n, ttl = event_log, 5, 1.0
    port = free_port()
    a = WorkerProc(log, "--lease-ttl", str(ttl), "--metrics-port", str(port),
                   "--metrics-addr", "127.0.0.1", env={"EC_TEST_HOLD_S": "0.5"}).start()
    b = WorkerProc(log, "--lease-ttl", str(ttl))
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            await feed.until(lambda: all(feed.count(s, "message") == 1 for s in sids))
            a.signal(signal.SIGSTOP)  # partitioned: A holds runs it can no longer renew
            await b.start().ready()

            def b_took_over() -> bool:
                return all(any(e.payload["pid"] == b.pid for e in feed.of(s, "progress"))
                           and feed.count(s, "run.completed") == 1 for s in sids)

            await feed.until(b_took_over)
            taken_over = {s: max(e.seq for e in feed.of(s)) for s in sids}
            a.signal(signal.SIGCONT)

            def a_gave_up() -> bool:
                m = scrape(port)
                return m["eventcore_worker_active"] == 0 and m["eventcore_worker_lost_total"] == n

            try:
                await eventually(a_gave_up, 20)
            except TimeoutError:
                raise AssertionError(f"{scrape(port)}\n{''.join(a.stderr)}") from None
            metrics = scrape(port)
        # A wrote nothing after B took over (its progress events would carry its pid)
        for sid in sids:
            events = await read_all(log, sid)
            check_log(events)
            late = [e for e in events if e.seq > taken_over[sid]]
            assert all(e.payload.get("pid") != a.pid for e in late if e.type == "progress")
            assert {e.payload["pid"] for e in events if e.type == "progress"} == {b.pid}
            assert (await log.get_session(sid)).host == b.id
            # any write carrying A's epoch is refused
            with pytest.raises(StaleHost):
                await log.emit(sid, "message", "from the old host", epoch=1)
        assert metrics["eventcore_worker_fenced_writes_total"] <= n
    finally:
        a.signal(signal.SIGCONT)
        a.kill()
        b.kill()


async def test_drain_hands_sessions_over_without_waiting_for_the_lease(
    event_log: EventLog, tmp_path: Path
) -> None:
    log, n, ttl = event_log, 10, 30.0  # a long lease: only the hand-back can be this quick
    effects = tmp_path / "effects"
    a = WorkerProc(log, "--lease-ttl", str(ttl), "--drain-timeout", "0.3",
                   env={"EC_TEST_EFFECTS": str(effects), "EC_TEST_HOLD_S": "600"}).start()
    b = WorkerProc(log, "--lease-ttl", str(ttl), env={"EC_TEST_EFFECTS": str(effects)})
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            await feed.until(lambda: all(feed.count(s, "message") == 1 for s in sids))
            await b.start().ready()
            sent = time.time()
            final = await a.stop()  # SIGTERM: drain 0.3 s, then hand back; exit code 0
            assert final["handed_back"] == n
            await feed.until(lambda: all(feed.count(s, "run.completed") == 1 for s in sids))
        for sid in sids:
            events = await read_all(log, sid)
            check_log(events)
            assert [e.type for e in events].count("message") == 1
            done = next(e for e in events if e.type == "run.completed")
            assert done.ts.timestamp() - sent < ttl
            assert (await log.get_session(sid)).epoch == 3  # A, the hand-back fence, B
            # a hand-back is not a failed attempt
            assert await log.redis.hget(log.keys.session(sid).meta, "attempt") is None
        assert sorted(collections.Counter(effect_lines(effects)).values()) == [1] * n
    finally:
        a.kill()
        b.kill()


async def test_a_flood_of_sessions_never_overloads_a_worker(event_log: EventLog,
                                                           tmp_path: Path) -> None:
    log, n, cap = event_log, 40, 4
    gate = tmp_path / "gate"
    port = free_port()
    procs = [WorkerProc(log, "-c", str(cap), *extra, env={"EC_TEST_GATE": str(gate)}).start()
             for extra in (("--metrics-port", str(port), "--metrics-addr", "127.0.0.1"), ())]
    try:
        for p in procs:
            await p.ready()
        async with watching(log) as feed:
            sids = [(await log.create_session("gate", labels={"hold": "0.05"})).session_id
                    for _ in range(n)]
            await feed.until(lambda: all(feed.count(s, "session.ended") for s in sids))
        running: collections.Counter[str] = collections.Counter()
        peak: collections.Counter[str] = collections.Counter()
        for line in effect_lines(gate):
            kind, pid, _ = line.split()
            running[pid] += 1 if kind == "enter" else -1
            peak[pid] = max(peak[pid], running[pid])
        assert sum(1 for line in effect_lines(gate) if line.startswith("exit")) == n
        assert max(peak.values()) <= cap, peak
        m = scrape(port)
        assert m["eventcore_worker_max_sessions"] == cap
        assert 0 <= m["eventcore_worker_load"] <= 1
        finals = [await p.stop() for p in procs]
        assert sum(f["completed"] for f in finals) == n
    finally:
        for p in procs:
            p.kill()


async def test_a_hogged_event_loop_does_not_let_leases_lapse(event_log: EventLog) -> None:
    """Whichever of two workers hosts the session (on a cluster the first to poll its shard,
    on one node the first blocked reader) blocks its loop for 3.5 lease TTLs: the heartbeat
    thread keeps the lease, so the other never takes the session over."""
    log, ttl = event_log, 1.0
    ports = {name: free_port() for name in ("a", "b")}
    a = WorkerProc(log, "--lease-ttl", str(ttl), "--metrics-port", str(ports["a"]),
                   "--metrics-addr", "127.0.0.1").start()
    b = WorkerProc(log, "--lease-ttl", str(ttl), "--metrics-port", str(ports["b"]),
                   "--metrics-addr", "127.0.0.1")
    try:
        await a.ready()
        await b.start().ready()
        async with watching(log) as feed:
            s = await log.create_session("hog", labels={"hog_s": "3.5"}, input="x")
            await feed.until(lambda: feed.count(s.session_id, "run.completed") == 1)
        info = await log.get_session(s.session_id)
        assert info.host in (a.id, b.id) and info.epoch == 1  # never re-hosted
        host, other = ("a", b) if info.host == a.id else ("b", a)
        m = scrape(ports[host])
        assert m["eventcore_worker_max_loop_lag_seconds"] > 2 * ttl  # the loop was blocked
        assert m["eventcore_worker_lost_total"] == 0
        assert (await other.stop())["claims"] == 0
        check_log(await read_all(log, s.session_id))
    finally:
        a.kill()
        b.kill()


@pytest.mark.redis_restart
async def test_supervisor_exits_non_zero_when_redis_stays_down(
    redis_server_factory: Callable[..., RedisServer], event_log: EventLog
) -> None:
    server = redis_server_factory()
    settings = load_settings(redis_url=server.url, namespace=event_log.settings.namespace,
                             shards=4)
    async with EventLog(settings) as log:
        w = WorkerProc(log, "--max-failures", "3",
                       env={"EVENTCORE_RETRY_BUDGET_S": "0.3"}).start()
        try:
            await w.ready()
            server.kill()
            assert await w.wait(SAFETY_S) == 1
            assert "failed 3 times in a row" in "".join(w.stderr)
        finally:
            w.kill()


@pytest.mark.redis_restart
async def test_hosting_survives_a_redis_restart(
    redis_server_factory: Callable[..., RedisServer], hosting: Hosting
) -> None:
    server = redis_server_factory()
    settings = load_settings(redis_url=server.url, namespace="restart", shards=4,
                             retry_budget_s=10)
    async with EventLog(settings) as log, hosting(log, poll_interval_s=0.2) as w:
        async with watching(log) as feed:
            s = await log.create_session("echo", input="before")
            await feed.until(lambda: feed.count(s.session_id, "run.completed") == 1)
        await anyio.to_thread.run_sync(server.restart)
        await log.append(Envelope(type="input", session_id=s.session_id, payload="after"))
        async with watching(log) as feed:
            await feed.until(lambda: feed.count(s.session_id, "run.completed") == 2)
        events = await read_all(log, s.session_id)
        check_log(events)
        assert [e.payload["text"] for e in events if e.type == "message"] == [
            "BEFORE", "AFTER"]
        assert w.metrics.claims == 1 and (await log.get_session(s.session_id)).epoch == 1



async def test_a_session_that_keeps_killing_its_workers_is_dead_lettered(
    event_log: EventLog,
) -> None:
    from eventcore.workers import dead_letters

    log = event_log
    args = ("--lease-ttl", "0.5", "--max-deliveries", "2")
    async with watching(log) as feed:
        s = await log.create_session("crasher")
        sid = s.session_id
        for _ in (1, 2):  # each worker that takes it dies with it
            w = WorkerProc(log, *args).start()
            try:
                await w.ready()
                assert await w.wait() == 3
            finally:
                w.kill()
            # the watcher reads the feed on its own: await what the worker wrote before dying
            await feed.until(lambda: feed.count(sid, "message") >= 1)
            assert feed.count(sid, "message") == 1  # the re-run's emit is deduplicated
        last = WorkerProc(log, *args).start()
        try:
            await last.ready()
            await feed.until(lambda: feed.count(sid, "session.ended") == 1)
            final = await last.stop()
        finally:
            last.kill()
    (dead,) = [d for d in await dead_letters(log) if d.session_id == sid]
    assert (dead.error.type, dead.error.retryable) == ("CrashLoop", False)
    ended = decode_payload(feed.of(sid, "session.ended")[0])
    assert ended.reason == "failed" and ended.error == dead.error
    assert feed.count(sid, "message") == 1  # (session.ended is after any duplicate)
    assert final["claims"] == 1 and final["reclaims"] == 1
    check_log(await read_all(log, sid))


async def test_after_sigkill_the_new_host_resumes_from_the_checkpoint(
    event_log: EventLog, tmp_path: Path
) -> None:
    log, effects = event_log, tmp_path / "effects"
    env = {"EC_TEST_EFFECTS": str(effects)}
    a = WorkerProc(log, "--lease-ttl", "1", env=env).start()
    b = WorkerProc(log, "--lease-ttl", "1", env=env)
    try:
        await a.ready()
        async with watching(log) as feed:
            sid = (await log.create_session("tally", input=1)).session_id
            await log.append(Envelope(type="input", session_id=sid, payload=2))
            await feed.until(lambda: feed.count(sid, "session.checkpoint") == 2)
            a.kill()
            await log.append(Envelope(type="input", session_id=sid, payload=3))
            await b.start().ready()
            await feed.until(lambda: feed.count(sid, "message") == 3)
        events = await read_all(log, sid)
        check_log(events)
        inputs = [e.seq for e in events if e.type == "input"]
        assert [e.payload["total"] for e in events if e.type == "message"] == [1, 3, 6]
        # A was given inputs 1 and 2; B, restored from A's checkpoint, only input 3
        assert effect_lines(effects) == [f"{a.pid} {sid} {inputs[0]}",
                                         f"{a.pid} {sid} {inputs[1]}",
                                         f"{b.pid} {sid} {inputs[2]}"]
        assert (await log.get_session(sid)).host == b.id
    finally:
        a.kill()
        b.kill()
