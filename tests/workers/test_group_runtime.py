"""The worker pool and the subscribers run on one consumer-group runtime (eventcore._groups):
both recover a lost group (NOGROUP) from their checkpoints, and both trim below every group's
floor."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

import anyio
from workers_support import eventually, watching

from eventcore import EventLog
from eventcore._groups import ConsumerGroup
from eventcore.subscribers import Delivery, SubscriberRunner
from eventcore.workers import Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


class _Recorder:
    name = "rec"

    def __init__(self) -> None:
        self.got: list[tuple[str, int]] = []

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        self.got += [(d.session_id, d.seq) for d in deliveries]


async def _caught_up(group: ConsumerGroup) -> bool:
    """Nothing pending, and the checkpoint this process knows is the group's position."""
    return all(st.exists and st.pending == 0
               and group.checkpoints.get(st.shard, "0-0") == st.last_delivered
               for st in await group.state())


async def _recreated(group: ConsumerGroup) -> bool:
    return all(st.exists for st in await group.state())


def _id_on_shard(log: EventLog, shard: int) -> str:
    while log.keys.shard_of(sid := uuid.uuid4().hex) != shard:
        pass
    return sid


async def test_worker_and_subscriber_recover_lost_groups_from_their_checkpoints(
    event_log: EventLog, hosting: Hosting
) -> None:
    """A dispatch group recreated from "0" hands every entry still in the stream out again:
    an acknowledged entry of a session that idled out would host it again (epoch + 1, a
    second session.started). Both users recreate their group where they had got to."""
    log = event_log
    rec = _Recorder()
    runner = SubscriberRunner(log, rec, block_ms=50, metrics_interval_s=0.02,
                              claim_idle_ms=60_000)
    async with hosting(log, idle_timeout_s=0.2, trim_interval_s=0.02) as w, runner, \
            watching(log) as feed:
        held = await log.create_session("held")
        shard = log.keys.shard_of(held.session_id)

        async def unloaded() -> bool:
            return (await log.get_session(held.session_id)).state == "idle"

        await eventually(unloaded)
        dispatch, feeds = w._group, runner.group_ops
        assert dispatch is not None
        await eventually(lambda: _caught_up(dispatch))
        await eventually(lambda: _caught_up(feeds))
        before = sorted(rec.got)
        for s in log.keys.all_shards():  # lost under both blocked reads
            await log.redis.xgroup_destroy(log.keys.dispatch(s), "workers")
            await log.redis.xgroup_destroy(log.keys.feed(s), "rec")
        await eventually(lambda: _recreated(dispatch))
        await eventually(lambda: _recreated(feeds))
        # read in order after the recovery: a stale entry of the held session's shard would
        # come out before this one
        later = await log.create_session("once", session_id=_id_on_shard(log, shard))
        await feed.until(lambda: feed.count(later.session_id, "session.ended") == 1)
        top = len(feed.of(later.session_id))
        with anyio.fail_after(10):
            await runner.wait_until(lambda m: (later.session_id, top) in rec.got)
    assert dispatch.recoveries >= 1 and runner.metrics.nogroup_recoveries >= 1
    info = await log.get_session(held.session_id)
    assert (info.epoch, feed.count(held.session_id, "session.started")) == (1, 1)
    assert sorted(rec.got[: len(before)]) == before
    assert len(rec.got) == len(set(rec.got))  # nothing delivered twice


async def test_the_dispatch_trim_keeps_what_another_group_still_needs(
    event_log: EventLog, hosting: Hosting
) -> None:
    """The worker's trim uses the same floor as retention's: below every group's oldest
    pending entry (it used to leave a dispatch stream another group reads untrimmed)."""
    log = event_log
    async with hosting(log, trim_interval_s=3600) as w, watching(log) as feed:
        group = w._group
        assert group is not None
        for s in log.keys.all_shards():
            await log.redis.xgroup_create(log.keys.dispatch(s), "audit", id="0")
        sids = [(await log.create_session("once", session_id=_id_on_shard(log, 0))).session_id
                for _ in range(3)]
        await feed.until(lambda: all(feed.count(s, "session.ended") == 1 for s in sids))
        await eventually(lambda: _nothing_pending(group))
        stream = log.keys.dispatch(0)
        ((_, entries),) = await log.redis.xreadgroup("audit", "a", {stream: ">"}, count=2)
        (first, _), (second, _) = entries
        await log.redis.xack(stream, "audit", first)
        await w._trim()
        left = [e for e, _ in await log.redis.xrange(stream)]
        assert left[0] == second and len(left) == 2  # audit has the second one pending
        await log.redis.xack(stream, "audit", second)
        await log.redis.xgroup_destroy(stream, "audit")
        await w._trim()
        assert len(await log.redis.xrange(stream)) == 1  # the last delivered one


async def _nothing_pending(group: ConsumerGroup) -> bool:
    return all(st.pending == 0 for st in await group.state())
