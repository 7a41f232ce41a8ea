"""Replicated acknowledgement beyond appends (``EVENTCORE_APPEND_REPLICAS=1``): a worker's
claim (the ``session.started`` it records) and a schedule's firing (the session it creates)
count only once the shard's replica confirmed them.

As in ``test_failover_honesty``: the master's replica is stopped (SIGSTOP) and its link cut,
so what the master takes then is certainly not replicated; the master is SIGKILLed and the
replica promoted. An unconfirmed claim is not hosted (claimed again once a replica confirms
it, one ``session.started`` in the log); an unconfirmed fire is reported as
``AppendNotReplicated`` and fired again after the failover lost it; what was acknowledged is
on the replica, so it survives the kill.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable

import anyio
import pytest
import redis
from cluster_support import fail_over, master_with_replica, rejoin_as_replica, sessions_on, stopped

from eventcore import AppendNotReplicated, EventLog, Settings, load_settings
from eventcore._layout import ENTRY_TYPE
from eventcore.schedules import Scheduler, Schedules, occurrence_session_id
from eventcore.testing._server import LocalCluster, RedisServer
from eventcore.testing.invariants import check_log, read_all
from eventcore.workers import App, Session, Worker

pytestmark = pytest.mark.redis_restart

T0 = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=dt.UTC).timestamp()


def _settings(cluster: LocalCluster, namespace: str) -> Settings:
    return load_settings(redis_url=cluster.url, namespace=namespace, shards=16,
                         retry_budget_s=40, append_replicas=1,
                         append_replicas_timeout_ms=500)


def _types(node: RedisServer, stream: str) -> list[str]:
    """The entry types of ``stream`` as ``node`` holds it (its own copy: a replica's too)."""
    with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5) as r:
        r.execute_command("READONLY")  # a cluster replica answers reads of its own data
        return [fields[ENTRY_TYPE.encode()].decode() for _, fields in r.xrange(stream)]


async def test_a_claim_is_hosted_only_once_its_session_started_is_replicated(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory(replicas=1, node_timeout_ms=2000)
    hosted = anyio.Event()
    app = App()

    @app.agent("hold")
    async def hold(session: Session) -> None:
        hosted.set()

    async with EventLog(_settings(cluster, "rclaim")) as log:
        victim = cluster.masters()[0]
        replica = cluster.replica_of(victim)
        (sid,) = sessions_on(cluster, log, victim, 1, "c")
        await log.create_session("hold", session_id=sid)  # acknowledged: the replica has it
        stream = log.keys.session(sid).stream
        with contextlib.ExitStack() as paused:
            paused.enter_context(stopped(replica))
            await anyio.to_thread.run_sync(
                lambda: victim.command("CLIENT", "KILL", "TYPE", "replica"))
            async with Worker(app, log, concurrency=4, lease_ttl_s=30.0, block_ms=100,
                              poll_interval_s=1.0, idle_timeout_s=60.0) as worker:
                with anyio.fail_after(60):
                    while not (hosted.is_set()  # noqa: ASYNC110 - a counter: nothing to await
                               or worker.metrics.snapshot().get("claims_not_replicated")):
                        await anyio.sleep(0.02)
                # the master took the claim and its session.started; no replica confirmed
                # them: the handler did not start
                assert not hosted.is_set() and worker.metrics.claims == 0
                assert "session.started" in _types(victim, stream)
                victim.kill()
                paused.close()
                await fail_over(cluster, victim, replica)
                # what was refused is indeed lost: the promoted replica never had the claim
                assert _types(replica, stream) == ["session.created"]
                # the promoted master has no replica: still not hosted until one is back
                await rejoin_as_replica(victim, replica)
                with anyio.fail_after(60):
                    await hosted.wait()
                # hosted = acknowledged: the replica (the old master) has session.started now
                assert "session.started" in _types(victim, stream)
                assert worker.metrics.claims >= 1
        events = await read_all(log, sid)
        check_log(events)
        assert [e.type for e in events].count("session.started") == 1


async def test_a_schedule_fire_counts_only_once_replicated(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory(replicas=1, node_timeout_ms=2000)
    async with EventLog(_settings(cluster, "rfire")) as log:
        keys = log.keys
        victim = cluster.masters()[0]
        replica = cluster.replica_of(victim)
        schedule_id = next(f"s{i}" for i in range(10_000)
                           if cluster.node_of_slot(cluster.keyslot(keys.schedule(f"s{i}")))
                           is victim)
        t = [T0]
        schedules = Schedules(log, now=lambda: t[0])
        await schedules.create(schedule_id, cron="* * * * *", agent="echo", input="tick")
        scheduler = Scheduler(log, now=lambda: t[0], grace_s=3600)

        def occurrence(minute: int) -> str:
            at = dt.datetime(2026, 6, 1, 12, minute, tzinfo=dt.UTC).timestamp()
            return occurrence_session_id(keys, schedule_id, int(at * 1000))

        t[0] += 60
        assert await scheduler.tick() == 1  # 12:01, acknowledged: on the replica
        kept = keys.session(occurrence(1)).stream
        assert _types(replica, kept) == ["session.created", "input"]

        with stopped(replica):
            await anyio.to_thread.run_sync(
                lambda: victim.command("CLIENT", "KILL", "TYPE", "replica"))
            t[0] += 60
            with pytest.raises(AppendNotReplicated) as refused:  # 12:02: not acknowledged
                await scheduler.tick()
            assert refused.value.what == "schedule fire" and refused.value.replicas == 0
            lost = keys.session(occurrence(2)).stream
            assert _types(victim, lost) == ["session.created", "input"]  # on the master only
            victim.kill()
        await fail_over(cluster, victim, replica)
        assert scheduler.fired == 1
        # the acknowledged fire survived; the refused one is lost with the master, so 12:02 is
        # due again and fired once a replica confirms it
        assert [e.type for e in await read_all(log, occurrence(1))] == ["session.created",
                                                                         "input"]
        assert _types(replica, lost) == []
        await rejoin_as_replica(victim, replica)
        with anyio.fail_after(60):
            while True:
                try:
                    assert await scheduler.tick() == 1
                    break
                except AppendNotReplicated:
                    continue  # the new replica may still be loading what it was sent
        events = await read_all(log, occurrence(2))
        assert [e.type for e in events] == ["session.created", "input"]
        assert events[1].payload == "tick"
        got = await schedules.get(schedule_id)
        assert got.fired == 2 and got.last_session_id == occurrence(2)


async def test_deletes_and_effect_claims_wait_for_the_replica_on_one_node(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """One node with a replica (a pool connection, not the appender's, carries an effect
    claim's WAIT): a delete and an effect's claim are refused while the replica cannot
    confirm them; the effect's function does not run under an unconfirmed claim, and runs
    once after."""
    master, replica = await master_with_replica(redis_server_factory)
    settings = load_settings(redis_url=master.url, namespace="w", shards=2, retry_budget_s=5,
                             append_replicas=1, append_replicas_timeout_ms=300)
    runs: list[int] = []

    async def fn() -> int:
        runs.append(1)
        return len(runs)

    async with EventLog(settings) as log:
        doomed = (await log.create_session()).session_id
        sid = (await log.create_session()).session_id
        with stopped(replica):
            with pytest.raises(AppendNotReplicated) as refused:
                await log.effect(sid, "charge", fn)
            assert runs == [] and refused.value.what == "effect claim"
            with pytest.raises(AppendNotReplicated) as refused:
                await log.delete_session(doomed)
        # its session.ended is appended first (and refused); delete.lua's own WAIT after it is
        # the same call as the claim's and the fire's
        assert refused.value.what == "append"
        assert await log.effect(sid, "charge", fn) == 1  # the claim was handed back
        assert await log.effect(sid, "charge", fn) == 1 and runs == [1]
        await log.delete_session(doomed)  # the retry: acknowledged once replicated
        assert (await log.incarnations([doomed]))[doomed] is None
