"""A dispatch read's claims for several shards go out in one round trip; one shard whose
script fails holds up no other shard's sessions. And the worker's GC thresholds while it
serves."""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from workers_support import ended_reason, watching

from eventcore import EventLog
from eventcore.workers import Worker
from eventcore.workers._worker import GC_THRESHOLD

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


def _on_two_shards(log: EventLog) -> tuple[str, str]:
    keys = log.keys
    a = next(f"p{i}" for i in range(1000) if keys.shard_of(f"p{i}") == 0)
    b = next(f"p{i}" for i in range(1000) if keys.shard_of(f"p{i}") == 1)
    return a, b


async def test_a_shard_whose_claim_fails_holds_up_no_other_shard(
        event_log: EventLog, hosting: Hosting) -> None:
    log = event_log
    good, bad = _on_two_shards(log)
    for shard in log.keys.all_shards():
        await log.redis.xgroup_create(log.keys.dispatch(shard), "workers", id="0",
                                      mkstream=True)
    await log.create_session("once", session_id=good)
    await log.create_session("once", session_id=bad)
    # the bad session's dedupe map is not a hash: its claim script fails (WRONGTYPE)
    dedupe = log.keys.session(bad).dedupe
    await log.redis.delete(dedupe)
    await log.redis.set(dedupe, "not a hash")
    async with watching(log) as feed, hosting(log, lease_ttl_s=30.0) as w:
        # both entries come in one read: the good one is hosted from it, not reclaimed later
        await feed.until(lambda: feed.count(good, "session.ended") == 1)
        assert ended_reason(feed.of(good, "session.ended")[0]) == "completed"
        assert w.metrics.reclaims == 0
        assert feed.count(bad, "session.ended") == 0


async def test_the_gc_runs_less_often_while_a_worker_serves(
        event_log: EventLog, hosting: Hosting) -> None:
    before = gc.get_threshold()
    assert before != GC_THRESHOLD
    async with hosting(event_log):
        assert gc.get_threshold() == GC_THRESHOLD
        async with hosting(event_log):
            assert gc.get_threshold() == GC_THRESHOLD
        assert gc.get_threshold() == GC_THRESHOLD  # another worker still serves
    assert gc.get_threshold() == before
    async with hosting(event_log, tune_gc=False):
        assert gc.get_threshold() == before
