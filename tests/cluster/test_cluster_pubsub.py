"""The notify/wake channels on a local 3-master Redis Cluster: scripts publish with SPUBLISH
(7.0+), the one listener (eventcore._channels) subscribes with one connection per master to
the channels of the slots it serves, follows a slot migration and a failover, and a worker's
feed is woken through it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from cluster_support import master_of, sessions_on_every_master

from eventcore import Envelope, EventLog, load_settings
from eventcore._append import APPEND_LUA
from eventcore._channels import ChannelEvent, Channels, Lost, Message
from eventcore._layout import META_HOST
from eventcore._redis import connect_redis
from eventcore.testing._server import LocalCluster
from eventcore.testing.invariants import read_all
from eventcore.workers import App, Session, Worker
from eventcore.workers._feed import Feed

SAFETY_S = 60


def _sharded(cluster: LocalCluster) -> bool:
    return not cluster.nodes[0].version.startswith(("6.", "5."))


class Recorder:
    """Every event of a listener, with a wait for a condition on them."""

    def __init__(self, listener: Channels) -> None:
        self.listener = listener
        self.events: list[ChannelEvent] = []
        self._changed = anyio.Event()

    async def run(self) -> None:
        async for event in self.listener:
            self.events.append(event)
            self._changed.set()
            self._changed = anyio.Event()

    async def until(self, pred: Callable[[], bool]) -> None:
        """Wait for ``pred``; re-checked at every event and every 50 ms, because part of what
        it looks at (the listener's routes, ``connected``) changes without an event (on
        Redis 6.2 a subscription moves off a demoted master without a loss to report)."""
        with anyio.fail_after(SAFETY_S):
            while not pred():
                with anyio.move_on_after(0.05):
                    await self._changed.wait()

    def notes(self) -> set[tuple[str, str]]:
        return {(e.channel.decode(), e.data.decode()) for e in self.events
                if isinstance(e, Message)}

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


async def _notified_everywhere(log: EventLog, rec: Recorder, sids: list[str]) -> None:
    """An append to each session is heard on its shard's notify channel."""
    want = set()
    for sid in sids:
        res = await log.append(Envelope(type="m", session_id=sid))
        want.add((log.keys.notify(log.keys.shard_of(sid)), f"{sid} {res.seq}"))
    await rec.until(lambda: want <= rec.notes())


async def test_the_scripts_publish_sharded_on_a_cluster(
    cluster_event_log: EventLog, redis_cluster: LocalCluster, redis_url: str
) -> None:
    script = cluster_event_log.redis.register_script(APPEND_LUA).script
    if _sharded(redis_cluster):
        assert "redis.call(EC_PUBLISH" in script and "local EC_PUBLISH = 'SPUBLISH'" in script
    else:
        assert script == APPEND_LUA  # Redis 6.2: a cluster broadcasts PUBLISH to every node
    # a single node's scripts are the prelude's, byte for byte
    single = connect_redis(redis_url)
    try:
        assert single.register_script(APPEND_LUA).script == APPEND_LUA
        assert "local EC_PUBLISH = 'PUBLISH'" in APPEND_LUA
        assert "'SPUBLISH'" not in APPEND_LUA
    finally:
        await single.aclose()


@pytest.mark.parametrize("shards", [16, 64])
async def test_one_connection_per_master_hears_every_shard(
    redis_cluster: LocalCluster, shards: int
) -> None:
    settings = load_settings(redis_url=redis_cluster.url, namespace=f"ch{shards}",
                             shards=shards, retry_budget_s=10)
    async with EventLog(settings) as log:
        channels = [log.keys.notify(s) for s in log.keys.all_shards()]
        async with Channels(log.redis, channels) as listener, anyio.create_task_group() as tg:
            assert listener.connected
            routes = listener.routes()
            if _sharded(redis_cluster):
                # one connection per master, not per shard: each to the channels it serves
                assert len(routes) == 3 and {r[1] for r in routes} == {"SSUBSCRIBE"}
                for name, _, chs in routes:
                    assert {master_of(redis_cluster, c).port for c in chs} == {
                        int(name.rpartition(":")[2])}
            else:
                assert len(routes) == 1 and routes[0][1] == "SUBSCRIBE"
            assert sorted(c for r in routes for c in r[2]) == sorted(channels)
            rec = Recorder(listener)
            tg.start_soon(rec.run)
            # one session in every shard
            by_shard: dict[int, str] = {}
            i = 0
            while len(by_shard) < shards:
                by_shard.setdefault(log.keys.shard_of(f"x{i}"), f"x{i}")
                i += 1
            for sid in by_shard.values():
                await log.create_session(session_id=sid)
            await _notified_everywhere(log, rec, list(by_shard.values()))
            assert listener.subscriptions == len(routes) and not rec.of(Lost)
            tg.cancel_scope.cancel()


async def test_a_moved_slot_is_subscribed_where_it_went(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory()
    if not _sharded(cluster):
        pytest.skip("sharded pub/sub needs Redis 7.0+")
    settings = load_settings(redis_url=cluster.url, namespace="mv", shards=16,
                             retry_budget_s=10)
    async with EventLog(settings) as log:
        by_master = sessions_on_every_master(cluster, log, 1)
        sids = [s for group in by_master.values() for s in group]
        for sid in sids:
            await log.create_session(session_id=sid)
        channels = [log.keys.notify(s) for s in log.keys.all_shards()]
        async with Channels(log.redis, channels) as listener, anyio.create_task_group() as tg:
            rec = Recorder(listener)
            tg.start_soon(rec.run)
            await _notified_everywhere(log, rec, sids)
            moving = log.keys.notify(log.keys.shard_of(sids[0]))
            source = master_of(cluster, moving)
            dest = next(n for n in cluster.masters() if n is not source)
            await anyio.to_thread.run_sync(cluster.move_slot, cluster.keyslot(moving), dest)
            # the source pushed sunsubscribe: that connection is made again, the moved channel
            # now on the destination's
            await rec.until(lambda: any(moving in e.channels for e in rec.of(Lost)))
            await rec.until(lambda: any(
                name.endswith(f":{dest.port}") and moving in chs
                for name, _, chs in listener.routes()) and listener.connected)
            await _notified_everywhere(log, rec, sids)
            tg.cancel_scope.cancel()


async def test_a_failover_moves_the_subscriptions_to_the_promoted_replica(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory(replicas=1)
    settings = load_settings(redis_url=cluster.url, namespace="fo", shards=16,
                             retry_budget_s=20)
    async with EventLog(settings) as log:
        by_master = sessions_on_every_master(cluster, log, 1)
        sids = [s for group in by_master.values() for s in group]
        for sid in sids:
            await log.create_session(session_id=sid)
        channels = [log.keys.notify(s) for s in log.keys.all_shards()]
        async with Channels(log.redis, channels, refresh_s=1.0) as listener, \
                anyio.create_task_group() as tg:
            rec = Recorder(listener)
            tg.start_soon(rec.run)
            await _notified_everywhere(log, rec, sids)
            old = master_of(cluster, log.keys.session(sids[0]).stream)
            replica = cluster.replica_of(old)
            before = listener.subscriptions
            await anyio.to_thread.run_sync(cluster.promote, replica)
            # (Redis 6.2: one SUBSCRIBE on any master, and a demoted master still hears the
            # broadcast: a subscription on the old master moves when the map is read again)
            resubscribed = _sharded(cluster)
            await rec.until(lambda: listener.connected
                            and (listener.subscriptions > before or not resubscribed)
                            and all(not n.endswith(f":{old.port}")
                                    for n, _, _ in listener.routes()))
            if resubscribed:
                assert any(n.endswith(f":{replica.port}") for n, _, _ in listener.routes())
            await _notified_everywhere(log, rec, sids)
            tg.cancel_scope.cancel()


class _Host:
    """What the feed needs of a hosted session (the worker's Session, without a handler):
    its cursor, and what was delivered to it."""

    def __init__(self, sid: str, cursor: int) -> None:
        self.id = sid
        self.cursor = cursor
        self.known = cursor
        self.refetch = False
        self.fetching = False
        self.got: list[tuple[int, str]] = []
        self.changed = anyio.Event()

    def defer_read(self) -> bool:
        return False

    def deliver(self, items: list[tuple[int, str, Envelope | None]]) -> None:
        for seq, typ, _ in items:
            if seq == self.cursor + 1:
                self.cursor = seq
                self.got.append((seq, typ))
        self.changed.set()
        self.changed = anyio.Event()


async def test_the_feed_is_woken_on_every_master(
    redis_cluster: LocalCluster,
) -> None:
    """The worker's feed, hosting sessions on every master (its poll an hour away): inputs
    appended from outside reach each host through the wake channel of its shard."""
    settings = load_settings(redis_url=redis_cluster.url, namespace="fd", shards=16,
                             retry_budget_s=10)
    async with EventLog(settings) as log:
        by_master = sessions_on_every_master(redis_cluster, log, 2, prefix="fd")
        sids = [s for group in by_master.values() for s in group]
        hosts: dict[str, Any] = {}
        for sid in sids:
            await log.create_session(session_id=sid)
            # hosted, as a claim records it (appends wake only a session that has a host)
            await log.redis.hset(log.keys.session(sid).meta, META_HOST, "w1")
            hosts[sid] = _Host(sid, 1)
        failures: list[BaseException] = []

        async def rewound(_: Any) -> None:
            raise AssertionError("no session went back")

        feed = Feed(log, hosts, poll_interval_s=3600.0,
                    on_failure=lambda _, exc: failures.append(exc),
                    on_success=lambda _: None, on_rewound=rewound)
        async with anyio.create_task_group() as tg:
            await tg.start(feed.run)
            for round_ in range(3):
                for sid in sids:
                    await log.append(Envelope(type="input", session_id=sid, payload=round_))
                with anyio.fail_after(SAFETY_S):
                    for sid in sids:
                        while len(hosts[sid].got) < round_ + 1:
                            await hosts[sid].changed.wait()
            tg.cancel_scope.cancel()
        for sid in sids:
            assert hosts[sid].got == [(2, "input"), (3, "input"), (4, "input")]
        assert not failures and feed.fetches >= 1


app = App()


@app.agent("echo")
async def echo(session: Session) -> None:
    async for msg in session.inputs():
        async with session.run("reply") as run:
            await run.emit("message", {"text": msg.payload})


async def test_a_hosted_idle_session_is_woken_on_every_master(
    redis_cluster: LocalCluster,
) -> None:
    """A worker hosts sessions on every master; inputs appended from outside reach their
    hosts through the sharded wake channel (the poll is an hour away)."""
    settings = load_settings(redis_url=redis_cluster.url, namespace="wk", shards=16,
                             retry_budget_s=10)
    async with EventLog(settings) as log:
        by_master = sessions_on_every_master(redis_cluster, log, 2, prefix="w")
        sids = [s for group in by_master.values() for s in group]
        async with Worker(app, log, concurrency=20, lease_ttl_s=5.0, block_ms=100,
                          poll_interval_s=3600.0, idle_timeout_s=3600.0) as worker:
            for sid in sids:
                await log.create_session("echo", session_id=sid, input="first")
            await _answered(log, sids, 1)
            assert set(sids) <= set(worker._hosts)
            fetches = worker.feed.fetches
            for sid in sids:  # hosted and idle now: only a wake brings these
                await log.append(Envelope(type="input", session_id=sid, payload="second"))
            await _answered(log, sids, 2)
            assert worker.feed.fetches > fetches


async def _answered(log: EventLog, sids: list[str], n: int) -> None:
    with anyio.fail_after(SAFETY_S):
        while True:
            counts = [sum(1 for e in await read_all(log, sid) if e.type == "message")
                      for sid in sids]
            if all(c >= n for c in counts):
                return
            await anyio.sleep(0.05)  # poll-with-deadline on the log itself
