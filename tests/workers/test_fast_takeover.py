"""Connection-closed takeover (workers._presence): a worker process that dies has its Redis
connections closed, and another worker hosts its sessions at once, long before their leases
lapse; a stopped (partitioned) one keeps its connections open and still waits for its lease;
and a checker whose own check fails evicts nobody.

Real worker processes (``eventcore worker``) host the sessions; the second worker runs in the
test, so its counters (checks, evictions, takeovers) are read directly."""

from __future__ import annotations

import collections
import os
import signal
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
from test_faults import create, effect_lines, scrape
from workers_support import WorkerProc, eventually, watching

from eventcore import Envelope, EventLog, load_settings
from eventcore._redis import is_cluster
from eventcore.errors import StaleHost
from eventcore.testing._server import free_port
from eventcore.testing.invariants import check_log, read_all
from eventcore.workers import Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


async def test_sigkill_with_a_30s_lease_the_sessions_are_taken_over_at_once(
    event_log: EventLog, hosting: Hosting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, n, ttl = event_log, 10, 30.0
    effects = tmp_path / "effects"
    monkeypatch.setenv("EC_TEST_EFFECTS", str(effects))  # the tool of the in-test worker too
    a = WorkerProc(log, "--lease-ttl", str(ttl),
                   env={"EC_TEST_EFFECTS": str(effects), "EC_TEST_HOLD_S": "600"}).start()
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            # every session is mid-run: its tool ran and was recorded, it replied, it holds
            await feed.until(lambda: all(feed.count(s, "message") == 1 for s in sids))
            async with hosting(log, lease_ttl_s=ttl) as b:  # (registered once it runs)
                for i, sid in enumerate(sids):  # inputs waiting in the stream, unread by A
                    await log.append(Envelope(type="input", session_id=sid,
                                              payload=f"second-{i}"))
                a.kill()
                # a third of the lease: only the closed connection can have moved them
                with anyio.fail_after(ttl / 3):
                    await feed.until(lambda: all(feed.count(s, "run.completed") == 2
                                                 for s in sids))
                    for i, sid in enumerate(sids):  # the new host answers new inputs
                        await log.append(Envelope(type="input", session_id=sid,
                                                  payload=f"third-{i}"))
                    await feed.until(lambda: all(feed.count(s, "run.completed") == 3
                                                 for s in sids))
                assert b.metrics.evictions == 1
                assert b.metrics.takeovers == n and b.metrics.claims == n
                for sid in sids:
                    info = await log.get_session(sid)
                    assert (info.host, info.epoch) == (b.id, 2)
        for i, sid in enumerate(sids):
            events = await read_all(log, sid)
            check_log(events)  # gap-free seq, each event key once
            assert [e.payload for e in events if e.type == "input"] == [
                f"first-{i}", f"second-{i}", f"third-{i}"]
            assert [e.payload["text"] for e in events if e.type == "message"] == [
                f"FIRST-{i}", f"SECOND-{i}", f"THIRD-{i}"]
            assert [e.type for e in events].count("tool.ended") == 3
            assert {e.payload["pid"] for e in events if e.type == "progress"} == {os.getpid()}
            # whatever the killed host still had in flight is refused
            with pytest.raises(StaleHost):
                await log.emit(sid, "message", "from the old host", epoch=1)
        counts = collections.Counter(effect_lines(effects))
        assert len(counts) == 3 * n and set(counts.values()) == {1}, counts.most_common(3)
    finally:
        a.kill()


async def test_sigkill_mid_tool_the_new_host_runs_it_again_at_once(
    event_log: EventLog, hosting: Hosting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead host's effect claim (its TTL is the lease's, 30 s) was made by a superseded
    epoch: it does not hold the new host back (effects are at least once: the tool runs
    again)."""
    log, n, ttl = event_log, 3, 30.0
    effects = tmp_path / "effects"
    monkeypatch.setenv("EC_TEST_EFFECTS", str(effects))
    a = WorkerProc(log, "--lease-ttl", str(ttl),
                   env={"EC_TEST_EFFECTS": str(effects), "EC_TEST_TOOL_HOLD_S": "600"}).start()
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            await eventually(lambda: len(effect_lines(effects)) == n)  # all mid-tool in A
            async with hosting(log, lease_ttl_s=ttl) as b:
                a.kill()
                with anyio.fail_after(ttl / 3):
                    await feed.until(lambda: all(feed.count(s, "run.completed") == 1
                                                 for s in sids))
                assert b.metrics.takeovers == n
        for i, sid in enumerate(sids):
            events = await read_all(log, sid)
            check_log(events)
            assert [e.payload["text"] for e in events if e.type == "message"] == [f"FIRST-{i}"]
            assert [e.type for e in events].count("effect") == 1  # recorded once, by B
        counts = collections.Counter(effect_lines(effects))
        assert len(counts) == n and set(counts.values()) == {2}  # ran in A, and again in B
    finally:
        a.kill()


async def test_two_workers_share_a_dead_workers_sessions_within_their_room(
    event_log: EventLog, hosting: Hosting
) -> None:
    """Neither has room for all: each takes what fits, at once, and nothing is hosted twice;
    one of them evicts (the compare-and-set), both take over."""
    log, n, ttl = event_log, 5, 30.0
    a = WorkerProc(log, "--lease-ttl", str(ttl), env={"EC_TEST_HOLD_S": "600"}).start()
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            await feed.until(lambda: all(feed.count(s, "message") == 1 for s in sids))
            async with hosting(log, lease_ttl_s=ttl, concurrency=3) as b, \
                    hosting(log, lease_ttl_s=ttl, concurrency=3) as c:
                a.kill()
                with anyio.fail_after(ttl / 3):
                    await eventually(lambda: b.metrics.active + c.metrics.active == n)
                    for i, sid in enumerate(sids):
                        await log.append(Envelope(type="input", session_id=sid,
                                                  payload=f"second-{i}"))
                    await feed.until(lambda: all(feed.count(s, "message") == 2 for s in sids))
                assert b.metrics.evictions + c.metrics.evictions == 1
                assert b.metrics.takeovers + c.metrics.takeovers == n
                assert max(b.metrics.active, c.metrics.active) == 3
                hosts = collections.Counter()
                for sid in sids:
                    info = await log.get_session(sid)
                    assert info.epoch == 2
                    hosts[info.host] += 1
                assert set(hosts) <= {b.id, c.id} and sum(hosts.values()) == n
        for i, sid in enumerate(sids):
            events = await read_all(log, sid)
            check_log(events)
            assert [e.payload["text"] for e in events if e.type == "message"] == [
                f"FIRST-{i}", f"SECOND-{i}"]
    finally:
        a.kill()


async def test_sigstop_keeps_the_connection_so_the_lease_decides(
    event_log: EventLog, hosting: Hosting
) -> None:
    log, n, ttl = event_log, 5, 3.0
    port = free_port()
    a = WorkerProc(log, "--lease-ttl", str(ttl), "--metrics-port", str(port),
                   "--metrics-addr", "127.0.0.1", env={"EC_TEST_HOLD_S": "0.5"}).start()
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            await feed.until(lambda: all(feed.count(s, "message") == 1 for s in sids))
            async with hosting(log, lease_ttl_s=ttl) as b:
                await eventually(lambda: b.metrics.presence_checks >= 1)
                a.signal(signal.SIGSTOP)  # partitioned: its sockets stay open in Redis
                checks = b.metrics.presence_checks
                await eventually(lambda: b.metrics.presence_checks >= checks + 5, interval=0.01)
                # several checks saw A's connection open: nothing moved (its lease, renewed
                # within a second before the stop, still has two seconds to run)
                for sid in sids:
                    info = await log.get_session(sid)
                    assert (info.host, info.epoch) == (a.id, 1)
                assert (b.metrics.evictions, b.metrics.takeovers, b.metrics.claims) == (0, 0, 0)

                def b_took_over() -> bool:
                    return all(any(e.payload["pid"] == os.getpid()
                                   for e in feed.of(s, "progress"))
                               and feed.count(s, "run.completed") == 1 for s in sids)

                await feed.until(b_took_over)  # once the lease lapsed: the reclaim path
                assert b.metrics.reclaims == n
                taken_over = {s: max(e.seq for e in feed.of(s)) for s in sids}
                a.signal(signal.SIGCONT)

                def a_gave_up() -> bool:
                    m = scrape(port)
                    return (m["eventcore_worker_active"] == 0
                            and m["eventcore_worker_lost_total"] == n)

                try:
                    await eventually(a_gave_up, 20)
                except TimeoutError:
                    raise AssertionError(f"{scrape(port)}\n{''.join(a.stderr)}") from None
                assert (b.metrics.evictions, b.metrics.takeovers) == (0, 0)
                for sid in sids:
                    assert (await log.get_session(sid)).host == b.id
        for sid in sids:
            events = await read_all(log, sid)
            check_log(events)
            late = [e for e in events if e.seq > taken_over[sid]]
            assert all(e.payload.get("pid") != a.pid for e in late if e.type == "progress")
            with pytest.raises(StaleHost):
                await log.emit(sid, "message", "from the old host", epoch=1)
    finally:
        a.signal(signal.SIGCONT)
        a.kill()


async def test_the_checkers_own_redis_error_evicts_nobody(
    event_log: EventLog, hosting: Hosting
) -> None:
    """The checker's user may not run CLIENT LIST: every check fails with an error reply
    (NOPERM), and it must not read that as "every connection is gone"."""
    log, n = event_log, 3
    user, password = f"nolist{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    version = (await log.redis.info("server"))["redis_version"]
    # Redis 6.2 cannot take a subcommand away (-client|list), only give one back
    deny = ("-client|list",) if int(str(version).split(".")[0]) >= 7 else ("-client", "+client|id")
    acl = ("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all", *deny)
    if is_cluster(log.redis):
        await log.redis.execute_command(*acl, target_nodes="all")  # type: ignore[call-arg]
    else:
        await log.redis.execute_command(*acl)
    url = urlsplit(str(log.settings.redis_url))
    restricted = urlunsplit(url._replace(netloc=f"{user}:{password}@{url.hostname}:{url.port}"))
    a = WorkerProc(log, "--lease-ttl", "30", env={"EC_TEST_HOLD_S": "600"}).start()
    try:
        await a.ready()
        async with watching(log) as feed:
            sids = await create(log, n)
            await feed.until(lambda: all(feed.count(s, "message") == 1 for s in sids))
        settings = load_settings(redis_url=restricted, namespace=log.settings.namespace,
                                 shards=log.settings.shards, retry_budget_s=10)
        async with EventLog(settings) as other, hosting(other, lease_ttl_s=30.0) as b:
            await eventually(lambda: b.metrics.presence_errors >= 5, interval=0.01)
            assert (b.metrics.presence_checks, b.metrics.evictions, b.metrics.takeovers) == (
                0, 0, 0)
            for sid in sids:
                info = await log.get_session(sid)
                assert (info.host, info.epoch) == (a.id, 1)
        assert a.proc is not None and a.proc.poll() is None
    finally:
        a.kill()
        delete = ("ACL", "DELUSER", user)
        if is_cluster(log.redis):
            await log.redis.execute_command(*delete, target_nodes="all")  # type: ignore[call-arg]
        else:
            await log.redis.execute_command(*delete)


async def test_a_clean_stop_leaves_the_registry(event_log: EventLog, hosting: Hosting) -> None:
    async with hosting(event_log) as w:
        await eventually(lambda: w.metrics.presence_checks >= 1)
        registered = await event_log.redis.hgetall(event_log.keys.presence())
        assert set(registered) == {w.id.encode()}
    assert await event_log.redis.hgetall(event_log.keys.presence()) == {}


