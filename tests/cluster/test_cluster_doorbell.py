"""The doorbell of consumer-group reads on a 3-master cluster (eventcore._doorbell): an idle
read waits for the shards' notification of a new entry, not for the safety poll (set to 30 s
here, every wait bounded by 10 s), on the feeds (``notify``) and on the dispatch streams
(every script that adds a dispatch entry publishes on ``Keys.dispatched``); an entry whose
notification was lost is read after the listener's connections are killed (the reconnect
rings), or by the safety poll; the subscriber runner and the worker wire it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from cluster_support import sessions_on_every_master
from group_support import eventually
from subscriber_helpers import Recorder

from eventcore import EventLog, load_settings
from eventcore._groups import ConsumerGroup, Entry
from eventcore._streams import ShardStreams
from eventcore.subscribers import SubscriberRunner
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import LocalCluster
from eventcore.workers import App, Session, Worker
from eventcore.workers._worker import DELAYED_LUA

SAFETY_POLL_S = 30.0
WITHIN_S = 10  # far below the safety poll and the reads' blocking time
BLOCK_MS = 60_000


@asynccontextmanager
async def _log(cluster: LocalCluster, **overrides: object) -> AsyncIterator[EventLog]:
    settings = load_settings(redis_url=cluster.url, namespace=unique_namespace(), shards=16,
                             retry_budget_s=10, cluster_safety_poll_s=SAFETY_POLL_S,
                             **overrides)
    async with EventLog(settings) as log:
        yield log


def _group(log: EventLog, stream: str = "feed", safety_poll_s: float = SAFETY_POLL_S
           ) -> ConsumerGroup:
    keys = log.keys
    if stream == "feed":
        return ConsumerGroup(ShardStreams(log.redis, keys.feed, keys.all_shards()), keys, "g",
                             "c", channel=keys.notify, safety_poll_s=safety_poll_s)
    return ConsumerGroup(ShardStreams(log.redis, keys.dispatch, keys.all_shards()), keys, "g",
                         "c", channel=keys.dispatched, safety_poll_s=safety_poll_s)


class Reader:
    """One blocking group read at a time, in a task: what it got, and when it is parked on
    the doorbell (after an empty poll)."""

    def __init__(self, group: ConsumerGroup) -> None:
        self.group = group
        self.got: list[Entry] = []
        self.done = anyio.Event()

    async def read(self) -> None:
        self.got = await self.group.read(10, BLOCK_MS)
        self.done.set()

    async def parked(self) -> None:
        bell = self.group.doorbell
        assert bell is not None
        await eventually(lambda: bell.waiting == 1, within=WITHIN_S)


async def test_an_idle_feed_read_is_woken_by_an_append_on_every_master(
    redis_cluster: LocalCluster,
) -> None:
    async with _log(redis_cluster) as log:
        by_master = sessions_on_every_master(redis_cluster, log, 1, "bell")
        sessions = [s for group in by_master.values() for s in group]
        for sid in sessions:
            await log.create_session(session_id=sid)
        group = _group(log)
        await group.ensure()
        assert group.doorbell is not None
        assert await group.read(100, None)  # the creations: the group reads from 0
        async with anyio.create_task_group() as tg:
            await tg.start(group.doorbell.listen)
            for sid in sessions:  # a shard of each master in turn
                reader = Reader(group)
                tg.start_soon(reader.read)
                await reader.parked()
                polls, looks = group.polls, group.looks
                with anyio.fail_after(WITHIN_S):
                    await log.emit(sid, "message", {"to": sid})
                    await reader.done.wait()
                assert [f[b"sid"].decode() for _, _, f in reader.got] == [sid]
                # woken by the ring: one poll more, of the shard rung only, no fast polling
                assert (group.polls, group.looks) == (polls + 1, looks + 1)
            tg.cancel_scope.cancel()


async def test_a_read_after_an_empty_one_polls_only_what_rang(redis_cluster: LocalCluster
                                                              ) -> None:
    async with _log(redis_cluster) as log:
        s = await log.create_session()
        group = _group(log)
        await group.ensure()
        assert group.doorbell is not None
        async with anyio.create_task_group() as tg:
            await tg.start(group.doorbell.listen)
            await eventually(lambda: group.doorbell is not None and group.doorbell.live,
                             within=WITHIN_S)
            assert await group.read(10, None)  # the creation
            assert await group.read(10, None) == []  # nothing new: the shards are quiet
            polls = group.polls
            assert await group.read(10, 50) == []  # nothing rang: not even one look
            assert group.polls == polls
            bell = group.doorbell
            rings = bell.rings
            await log.emit(s.session_id, "message", {})
            await eventually(lambda: bell.since(rings) == {log.keys.shard_of(s.session_id)},
                             within=WITHIN_S)
            looks = group.looks
            got = await group.read(10, 50)  # the shard rung only
            assert [f[b"sid"].decode() for _, _, f in got] == [s.session_id]
            assert (group.polls, group.looks) == (polls + 1, looks + 1)
            tg.cancel_scope.cancel()


def _calls(cluster: LocalCluster, *names: str) -> list[int]:
    stats = [n.command("INFO", "commandstats") for n in cluster.masters()]
    return [sum(int(line.split("calls=")[1].split(",")[0]) for text in stats
                for line in text.splitlines() if line.startswith(f"cmdstat_{name}:"))
            for name in names]


async def test_a_poll_is_one_xreadgroup_per_stream_and_nothing_else(
    redis_cluster: LocalCluster,
) -> None:
    """redis-py asks a node for the keys of XREADGROUP (COMMAND GETKEYS, a round trip per
    stream per poll) unless the client finds them after STREAMS itself."""
    async with _log(redis_cluster) as log:
        group = _group(log)
        await group.ensure()
        before = _calls(redis_cluster, "xreadgroup", "command|getkeys")
        assert await group.read(10, None) == []
        after = _calls(redis_cluster, "xreadgroup", "command|getkeys")
        assert [b - a for a, b in zip(before, after, strict=True)] == [log.keys.shards, 0]


async def test_every_dispatch_entry_rings_the_dispatch_read(redis_cluster: LocalCluster
                                                            ) -> None:
    """append.lua (a session created for an agent) and the worker scripts (here delayed.lua,
    a retry made due) write dispatch entries through the prelude, which publishes."""
    async with _log(redis_cluster) as log:
        group = _group(log, "dispatch")
        await group.ensure()
        assert group.doorbell is not None
        delayed = log.redis.register_script(DELAYED_LUA)
        async with anyio.create_task_group() as tg:
            await tg.start(group.doorbell.listen)
            reader = Reader(group)
            tg.start_soon(reader.read)
            await reader.parked()
            with anyio.fail_after(WITHIN_S):
                s = await log.create_session("agent-x")
                await reader.done.wait()
            assert [f[b"sid"].decode() for _, _, f in reader.got] == [s.session_id]

            reader = Reader(group)
            tg.start_soon(reader.read)
            await reader.parked()
            shard = log.keys.shard_of(s.session_id)
            await log.redis.zadd(log.keys.delayed(shard), {s.session_id: 1})
            with anyio.fail_after(WITHIN_S):
                moved = await delayed(keys=[log.keys.delayed(shard), log.keys.dispatch(shard)],
                                      args=[int(time.time() * 1000), 10])
                assert moved == 1
                await reader.done.wait()
            assert [f[b"reason"].decode() for _, _, f in reader.got] == ["retry"]
            tg.cancel_scope.cancel()


async def _unnotified_entry(log: EventLog, shard: int) -> str:
    """A feed entry added without its notification (as if pub/sub had dropped it)."""
    raw = await log.redis.xadd(log.keys.feed(shard), {"sid": "lost", "seq": "1"})
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def test_a_lost_notification_is_read_after_the_listener_reconnects(
    redis_cluster: LocalCluster,
) -> None:
    async with _log(redis_cluster) as log:
        group = _group(log)
        await group.ensure()
        bell = group.doorbell
        assert bell is not None
        async with anyio.create_task_group() as tg:
            await tg.start(bell.listen)
            reader = Reader(group)
            tg.start_soon(reader.read)
            await reader.parked()
            entry = await _unnotified_entry(log, 3)
            rings = bell.rings
            with anyio.fail_after(WITHIN_S):
                for node in redis_cluster.masters():  # the listener's connections
                    node.command("CLIENT", "KILL", "TYPE", "pubsub")
                await reader.done.wait()
            assert [(shard, eid) for shard, eid, _ in reader.got] == [(3, entry)]
            assert bell.rings > rings
            tg.cancel_scope.cancel()


async def test_a_lost_notification_is_read_by_the_safety_poll(redis_cluster: LocalCluster
                                                              ) -> None:
    async with _log(redis_cluster) as log:
        group = _group(log, safety_poll_s=0.2)
        await group.ensure()
        assert group.doorbell is not None
        async with anyio.create_task_group() as tg:
            await tg.start(group.doorbell.listen)
            reader = Reader(group)
            tg.start_soon(reader.read)
            await reader.parked()
            rings = group.doorbell.rings
            entry = await _unnotified_entry(log, 5)
            with anyio.fail_after(WITHIN_S):
                await reader.done.wait()
            assert [(shard, eid) for shard, eid, _ in reader.got] == [(5, entry)]
            assert group.doorbell.rings == rings  # nothing rang: the safety poll read it
            tg.cancel_scope.cancel()


async def test_without_the_doorbell_the_read_polls(redis_cluster: LocalCluster) -> None:
    async with _log(redis_cluster, cluster_doorbell=False) as log:
        runner = SubscriberRunner(log, Recorder(), block_ms=BLOCK_MS)
        assert runner.group_ops.doorbell is None
        group = _group(log)
        assert group.doorbell is not None  # (the setting is the callers' to pass)


async def test_an_idle_subscriber_is_woken_by_an_append(redis_cluster: LocalCluster) -> None:
    async with _log(redis_cluster) as log:
        s = await log.create_session()
        sink = Recorder()
        # reclaims far apart too: nothing but the doorbell ends the read's wait
        async with SubscriberRunner(log, sink, block_ms=BLOCK_MS, claim_idle_ms=600_000
                                    ) as runner:
            await runner.wait_until(lambda m: m.acked >= 1)  # session.created
            bell = runner.group_ops.doorbell
            assert bell is not None
            await eventually(lambda: bell.waiting == 1, within=WITHIN_S)
            with anyio.fail_after(WITHIN_S):
                await log.emit(s.session_id, "message", {"n": 1})
                await runner.wait_until(lambda m: m.acked >= 2)
        assert [d.envelope.type for d in sink.got] == ["session.created", "message"]


async def test_an_idle_worker_hosts_a_new_session_at_once(redis_cluster: LocalCluster) -> None:
    hosted = anyio.Event()
    app = App()

    @app.agent("bell")
    async def bell_agent(session: Session) -> None:
        hosted.set()

    async with _log(redis_cluster) as log, Worker(
            app, log, block_ms=BLOCK_MS, poll_interval_s=60.0, drain_timeout_s=5.0) as w:
        assert w._group is not None
        bell = w._group.doorbell
        assert bell is not None and w.feed.bell is bell  # one listener for both
        await eventually(lambda: bell.waiting == 1, within=WITHIN_S)
        with anyio.fail_after(WITHIN_S):
            await log.create_session("bell")
            await hosted.wait()
