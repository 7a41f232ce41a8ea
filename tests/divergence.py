"""Playing a failover that lost acknowledged appends on one node (asynchronous replication:
the promoted replica lacked the last writes), for the epoch tests of every transport."""

from __future__ import annotations

from eventcore import EventLog


async def lose_tail(log: EventLog, sid: str, keep: int) -> None:
    """The shard's write counter behind this writer's, the session's stream and seq back at
    ``keep``: what a promoted replica that lacked the last appends looks like."""
    keys = log.keys.session(sid)
    kept = await log.redis.xrange(keys.stream, "-", f"0-{keep}")
    async with log.redis.pipeline(transaction=True) as pipe:
        pipe.hset(log.keys.epoch(keys.shard), "wc", 0)
        pipe.delete(keys.stream)
        for entry_id, fields in kept:
            pipe.xadd(keys.stream, fields, id=entry_id)
        pipe.hset(keys.meta, "seq", keep)
        await pipe.execute()
