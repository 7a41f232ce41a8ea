"""Faults on a dedicated 3-master cluster: a master restarted (clean or SIGKILL) in the middle
of a burst of appends over every master; a master gone past the retry budget."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from eventcore import Envelope, EventLog, RedisUnavailable, load_settings
from eventcore.testing._server import LocalCluster, RedisServer
from eventcore.testing.invariants import assert_acknowledged_present, check_log, read_all

pytestmark = pytest.mark.redis_restart


def _sessions_on_every_master(
    cluster: LocalCluster, log: EventLog, per: int
) -> dict[int, list[str]]:
    """``per`` session ids served by each master (by port)."""
    out: dict[int, list[str]] = {n.port: [] for n in cluster.masters()}
    i = 0
    while any(len(v) < per for v in out.values()):
        sid = f"f-{i}"
        i += 1
        port = cluster.node_of_slot(cluster.keyslot(log.keys.session(sid).stream)).port
        if len(out[port]) < per:
            out[port].append(sid)
    return out


@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "sigkill"])
async def test_master_restart_during_burst(
    redis_cluster_factory: Callable[..., LocalCluster], hard: bool
) -> None:
    cluster = redis_cluster_factory()
    settings = load_settings(redis_url=cluster.url, namespace="burst", shards=16,
                             retry_budget_s=20)
    async with EventLog(settings) as log:
        by_master = _sessions_on_every_master(cluster, log, 2)
        sessions = [s for group in by_master.values() for s in group]
        for sid in sessions:
            await log.create_session(session_id=sid)
        victim: RedisServer = cluster.node_of_slot(
            cluster.keyslot(log.keys.session(sessions[0]).stream))
        acked: dict[str, dict[str, int]] = {s: {} for s in sessions}
        count = 0
        after_restart: dict[str, int] = dict.fromkeys(sessions, 0)
        halfway = anyio.Event()
        restarted = False
        at_restart = 0

        victims = by_master[victim.port]

        def went_on() -> bool:  # an append to the restarted master's sessions after it
            return restarted and any(after_restart[s] for s in victims)

        async def producer(p: int) -> None:
            nonlocal count
            i = -1
            # 40 appends each, and on until one to the restarted master's sessions came after
            # it (fast producers could otherwise be through before it is back)
            while (i := i + 1) < 40 or not went_on():
                sid = sessions[(p + i) % len(sessions)]
                key = f"p{p}-{i}" if p % 2 else ""  # chosen keys and generated ones
                if i % 5 == 2:
                    res = await log.append_many([
                        Envelope(type="m", session_id=sid, payload=[p, i, j],
                                 event_key=f"{key}.{j}" if key else "") for j in range(3)])
                else:
                    res = [await log.append(Envelope(type="m", session_id=sid, payload=[p, i],
                                                     event_key=key))]
                for r in res:
                    assert not r.duplicate
                    acked[sid][r.event_key] = r.seq
                    count += 1
                    after_restart[sid] += restarted
                if count >= 300:
                    halfway.set()

        async def restart() -> None:
            nonlocal restarted, at_restart
            await halfway.wait()
            at_restart = count
            await anyio.to_thread.run_sync(lambda: victim.restart(hard=hard))
            restarted = True

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(restart)
                for p in range(18):
                    tg.start_soon(producer, p)
        assert restarted and 300 <= at_restart < count  # the restart hit the burst midway
        # appends to the restarted master's sessions went on after it came back
        assert sum(after_restart[s] for s in victims) > 0
        for sid in sessions:
            full = await read_all(log, sid)
            check_log(full)  # gap-free from 1, each event key once: no duplicate
            assert_acknowledged_present(full, acked[sid])
            assert len(full) == len(acked[sid]) + 1  # the creation and what was acknowledged
        # retrying acknowledged appends with their keys answers the first seq
        for sid in sessions:
            keys = [k for k in acked[sid] if k.startswith("p")][:10]
            again = await log.append_many(
                [Envelope(type="m", session_id=sid, event_key=k) for k in keys])
            assert [(r.seq, r.duplicate) for r in again] == [(acked[sid][k], True) for k in keys]


async def test_master_down_past_the_budget(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory()
    settings = load_settings(redis_url=cluster.url, namespace="down", shards=16,
                             retry_budget_s=1)
    async with EventLog(settings) as log:
        by_master = _sessions_on_every_master(cluster, log, 1)
        for group in by_master.values():
            await log.create_session(session_id=group[0])
        victim = next(n for n in cluster.masters() if n is not cluster.nodes[0])
        lost, kept = by_master[victim.port][0], by_master[cluster.nodes[0].port][0]
        victim.kill()
        with anyio.fail_after(30):
            with pytest.raises(RedisUnavailable):
                await log.emit(lost, "m", 1)
            with pytest.raises(RedisUnavailable):
                await log.read(lost)
            with pytest.raises(RedisUnavailable):
                await log.append_many([Envelope(type="m", session_id=lost)])
            # the other masters' sessions are served meanwhile
            assert (await log.emit(kept, "m", 1)).seq == 2
        await anyio.to_thread.run_sync(victim.start)
        await anyio.to_thread.run_sync(cluster.wait_ok)
        assert (await log.emit(lost, "m", 2)).seq == 2  # and it recovers once the master is back
        check_log(await read_all(log, lost))


async def test_failover_to_a_replica(redis_cluster_factory: Callable[..., LocalCluster]) -> None:
    """SIGKILL a master with a replica: the replica is promoted (it has no scripts: Redis 7
    does not replicate the script cache) and appends go on within the budget."""
    cluster = redis_cluster_factory(replicas=1, node_timeout_ms=2000)
    settings = load_settings(redis_url=cluster.url, namespace="fo", shards=16,
                             retry_budget_s=30)
    async with EventLog(settings) as log:
        by_master = _sessions_on_every_master(cluster, log, 2)
        sessions = [s for group in by_master.values() for s in group]
        for sid in sessions:
            await log.create_session(session_id=sid)
            await log.append_many([Envelope(type="m", session_id=sid, payload=i,
                                            event_key=f"before-{i}") for i in range(5)])
        victim = cluster.node_of_slot(cluster.keyslot(log.keys.session(sessions[0]).stream))
        replica = cluster.replica_of(victim)
        await anyio.to_thread.run_sync(cluster.wait_synced)  # what was acknowledged is there
        victim.kill()
        with anyio.fail_after(60):
            for sid in sessions:  # the victim's first: they wait for the promotion
                r = await log.emit(sid, "m", "after", event_key="after")
                assert r.seq == 7 and not r.duplicate
                again = await log.emit(sid, "m", "after", event_key="after")
                assert again.duplicate and again.seq == 7
        slot = cluster.keyslot(log.keys.session(sessions[0]).stream)
        assert cluster.node_of_slot(slot) is replica  # promoted
        for sid in sessions:
            full = await read_all(log, sid)
            check_log(full)
            assert [e.event_key for e in full[1:]] == [*(f"before-{i}" for i in range(5)),
                                                       "after"]


async def test_slot_migrated_while_appending(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    """A shard's slot moves to another master under a burst of appends to its sessions (ASK,
    TRYAGAIN, then MOVED): no acknowledged append lost, none twice."""
    cluster = redis_cluster_factory()
    settings = load_settings(redis_url=cluster.url, namespace="mv", shards=16,
                             retry_budget_s=30)
    async with EventLog(settings) as log:
        sid0 = "mv-0"
        shard = log.keys.shard_of(sid0)
        sessions = [s for s in (f"mv-{i}" for i in range(2000))
                    if log.keys.shard_of(s) == shard][:6]
        for sid in sessions:
            await log.create_session(session_id=sid)
        slot = cluster.keyslot(log.keys.feed(shard))
        source = cluster.node_of_slot(slot)
        target = next(n for n in cluster.masters() if n is not source)
        acked: dict[str, dict[str, int]] = {s: {} for s in sessions}
        started = anyio.Event()
        migrating = migrated = False
        during = after = 0

        async def producer(p: int) -> None:
            nonlocal after, during
            for i in range(60):
                sid = sessions[(p + i) % len(sessions)]
                r = await log.append(Envelope(type="m", session_id=sid, payload=[p, i],
                                              event_key=f"p{p}-{i}"))
                assert not r.duplicate
                acked[sid][r.event_key] = r.seq
                after += migrated
                during += migrating and not migrated
                if i == 5:
                    started.set()

        moved = 0

        async def run_migration() -> None:
            nonlocal moved, migrating, migrated
            await started.wait()
            migrating = True
            # one key per MIGRATE: a long migration, which the appends run into
            moved = await anyio.to_thread.run_sync(
                lambda: cluster.move_slot(slot, target, batch=1))
            migrated = True

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_migration)
                for p in range(12):
                    tg.start_soon(producer, p)
        assert moved > 6 * 5  # the sessions' keys, the feed, the dispatch stream...
        assert during > 0 and after > 0  # appends acknowledged mid-migration and after it
        assert cluster.node_of_slot(slot) is target
        for sid in sessions:
            full = await read_all(log, sid)
            check_log(full)
            assert_acknowledged_present(full, acked[sid])
            assert len(full) == len(acked[sid]) + 1
