"""Reclaiming dispatch entries from other workers: only hostings that died count as
deliveries towards the crash-loop limit."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from workers_support import ended_reason, eventually, watching

from eventcore import EventLog
from eventcore._layout import META_EPOCH
from eventcore.workers import Worker, dead_letters

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]
GROUP = "workers"


async def test_an_entry_whose_lease_still_lives_is_not_counted_as_a_delivery(
    event_log: EventLog, hosting: Hosting
) -> None:
    """XAUTOCLAIM counts a delivery even when the claim then finds the session's lease alive
    (the previous host is slow, or its lease lapses a moment later). Counted, two such
    near-misses would dead-letter a session whose only host died once."""
    log, keys = event_log, event_log.keys
    for shard in keys.all_shards():
        await log.redis.xgroup_create(keys.dispatch(shard), GROUP, id="0", mkstream=True)
    s = await log.create_session("once")
    sk = keys.session(s.session_id)
    got = []
    for shard in keys.all_shards():  # a ghost worker takes the entry first and holds a lease
        got += await log.redis.xreadgroup(GROUP, "ghost", {keys.dispatch(shard): ">"}) or []
    ((stream, ((eid, _),)),) = got
    # (as its claim would have: a lease is only ever taken with an epoch bump)
    await log.redis.hincrby(sk.meta, META_EPOCH, 1)
    await log.redis.set(sk.lease, "ghost")

    async def make_idle() -> None:  # as if nobody had renewed it for a minute
        await log.redis.xclaim(stream, GROUP, "ghost", 0, [eid], idle=60_000, justid=True)

    async def pending_entry() -> dict[str, object]:
        (entry,) = await log.redis.xpending_range(stream, GROUP, "-", "+", 10)
        return dict(entry)

    async with hosting(log, max_deliveries=2, reclaim_interval_s=3600) as w, \
            watching(log) as feed:
        for _ in range(3):  # the ghost's lease lives: each reclaim hands the entry back
            await make_idle()
            await w._reclaim()
            entry = await pending_entry()
            assert (entry["consumer"], entry["times_delivered"]) == (b"ghost", 1)
        assert w.metrics.claims == 0
        await log.redis.delete(sk.lease)  # now the ghost is gone for good
        await make_idle()
        await w._reclaim()
        await feed.until(lambda: feed.count(s.session_id, "session.ended") == 1)
    assert ended_reason(feed.of(s.session_id, "session.ended")[0]) == "completed"
    assert feed.count(s.session_id, "message") == 1
    assert w.metrics.reclaims == 1
    assert [d for d in await dead_letters(log) if d.session_id == s.session_id] == []


async def test_a_session_claimed_long_after_its_entry_was_read_is_not_reclaimed_from_its_host(
    event_log: EventLog, hosting: Hosting
) -> None:
    """An entry read, then claimed only later (it waited in the worker's backlog, or claims
    queued behind a burst), kept the idle time it had since it was read until the first
    heartbeat after the claim: past a lease TTL, the worker's own reclaim took it and hosted
    the session a second time (the handler started over, epoch + 1). At 20,000 sessions this
    re-hosted a few dozen in every run. The claim restarts the entry's idle time."""
    log, keys = event_log, event_log.keys
    for shard in keys.all_shards():
        await log.redis.xgroup_create(keys.dispatch(shard), GROUP, id="0", mkstream=True)
    s = await log.create_session("held")
    got = []
    for shard in keys.all_shards():  # read as the worker, a minute ago
        got += [(shard, item) for item in await log.redis.xreadgroup(
            GROUP, "w1", {keys.dispatch(shard): ">"}) or []]
    ((shard, (stream, ((eid, fields),))),) = got
    await log.redis.xclaim(stream, GROUP, "w1", 0, [eid], idle=60_000, justid=True)
    async with hosting(log, worker_id="w1", lease_ttl_s=30, heartbeat_interval_s=3600,
                       reclaim_interval_s=3600) as w:
        w._backlog.append((shard, eid.decode(), fields))  # the worker claims it from there
        await eventually(lambda: s.session_id in w._hosts)
        await w._reclaim()
        assert (await log.get_session(s.session_id)).epoch == 1
        assert (w.metrics.claims, w.metrics.reclaims) == (1, 0)
        assert w._hosts[s.session_id].epoch == 1


async def test_reclaim_leaves_a_session_hosted_here_alone_when_its_heartbeat_was_late(
    event_log: EventLog, hosting: Hosting
) -> None:
    """A heartbeat late by more than the lease TTL less its interval (renewing 20,000 leases
    on a loaded machine) leaves a live hosting's entry idle long enough for XAUTOCLAIM: the
    worker's own reclaim must not host it a second time, nor count it as a delivery."""
    log = event_log
    async with hosting(log, lease_ttl_s=30, heartbeat_interval_s=3600,
                       reclaim_interval_s=3600) as w:
        s = await log.create_session("held")
        await eventually(lambda: s.session_id in w._hosts)
        stream = log.keys.dispatch(w._hosts[s.session_id].shard)
        eid = w._hosts[s.session_id].entry_id
        await log.redis.xclaim(stream, GROUP, w.id, 0, [eid], idle=60_000, justid=True)
        await w._reclaim()
        assert (await log.get_session(s.session_id)).epoch == 1
        assert (w.metrics.claims, w.metrics.reclaims) == (1, 0)
        (entry,) = await log.redis.xpending_range(stream, GROUP, eid, eid, 1)
        assert (entry["consumer"].decode(), entry["times_delivered"]) == (w.id, 1)
