"""Reclaiming dispatch entries from other workers: only hostings that died count as
deliveries towards the crash-loop limit."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from workers_support import ended_reason, watching

from eventcore import EventLog
from workers import Worker, dead_letters

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
