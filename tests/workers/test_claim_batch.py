"""claim.lua looks up a batch's pending entries with one XPENDING over the batch's id range:
an entry no longer pending to the caller is ``gone`` (whatever else is pending in the range),
and a range holding more pending entries than the look-up returns falls back to one look-up
per entry."""

from __future__ import annotations

import time
from typing import Any

from eventcore import EventLog
from eventcore._codec import dispatch_session, session_started_parts
from eventcore._redis import run_script
from eventcore.workers._scripts import GROUP, decode_claim
from eventcore.workers._worker import CLAIM_LUA


async def _pending_to(log: EventLog, shard: int, n: int, consumer: str
                      ) -> list[tuple[str, str]]:
    """``n`` sessions created on ``shard``, their dispatch entries read by ``consumer``:
    (entry id, session id) in stream order."""
    keys = log.keys
    stream = keys.dispatch(shard)
    await log.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    made = 0
    i = 0
    while made < n:
        sid = f"cb{i}"
        i += 1
        if keys.shard_of(sid) == shard:
            await log.create_session("agent-x", session_id=sid)
            made += 1
    got = await log.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=n + 10)
    ((_, entries),) = got
    return [(eid.decode(), dispatch_session(fields)) for eid, fields in entries]


async def _claim(log: EventLog, shard: int, items: list[tuple[str, str]], me: str
                 ) -> list[Any]:
    keys = log.keys
    args: list[Any] = [me, 15_000, GROUP, 10, int(time.time() * 1000), keys.notify(shard), b"",
                       ""]
    ks = [keys.dispatch(shard), keys.dead(shard), keys.feed(shard)]
    for eid, sid in items:
        sk = keys.session(sid)
        ks += (sk.meta, sk.lease, sk.stream, sk.dedupe)
        head, args[6] = session_started_parts(sid)
        args += (eid, sid, head)
    script = log.redis.register_script(CLAIM_LUA)
    return [decode_claim(r) for r in await run_script(script, ks, args)]


async def _hosted_by(log: EventLog, sid: str, me: str, epoch: int) -> None:
    sk = log.keys.session(sid)
    meta = await log.redis.hmget(sk.meta, "epoch", "state", "host", "seq")
    assert meta == [str(epoch).encode(), b"active", me.encode(), b"2"]
    assert await log.redis.get(sk.lease) == me.encode()


async def test_an_entry_taken_over_is_gone_the_rest_of_the_batch_is_hosted(
        event_log: EventLog) -> None:
    log = event_log
    entries = await _pending_to(log, 0, 5, "w1")
    stream = log.keys.dispatch(0)
    taken = entries[2]
    await log.redis.xclaim(stream, GROUP, "w2", 0, [taken[0]], justid=True)
    claims = await _claim(log, 0, entries, "w1")
    assert [c.verdict for c in claims] == ["ok", "ok", "gone", "ok", "ok"]
    for (_, sid), c in zip(entries, claims, strict=True):
        if c.verdict == "ok":
            assert (c.epoch, c.started, c.last_seq) == (1, 2, 1)
            await _hosted_by(log, sid, "w1", 1)
    # nothing was written for the entry that was gone
    sk = log.keys.session(taken[1])
    assert await log.redis.hmget(sk.meta, "epoch", "state") == [b"0", b"created"]
    assert await log.redis.get(sk.lease) is None


async def test_a_range_with_more_pending_than_the_lookup_returns_is_looked_up_per_entry(
        event_log: EventLog) -> None:
    log = event_log
    entries = await _pending_to(log, 1, 80, "w1")
    stream = log.keys.dispatch(1)
    # the batch spans all 80 pending entries but holds 3 of them (3 + 64 < 80)
    batch = [entries[0], entries[40], entries[-1]]
    await log.redis.xclaim(stream, GROUP, "w2", 0, [entries[40][0]], justid=True)
    claims = await _claim(log, 1, batch, "w1")
    assert [c.verdict for c in claims] == ["ok", "gone", "ok"]
    await _hosted_by(log, batch[0][1], "w1", 1)
    await _hosted_by(log, batch[2][1], "w1", 1)


async def test_a_rehosted_session_bumps_its_epoch_and_dedupes_session_started(
        event_log: EventLog) -> None:
    log = event_log
    entries = await _pending_to(log, 2, 2, "w1")
    first = await _claim(log, 2, entries, "w1")
    assert [(c.verdict, c.epoch, c.started) for c in first] == [("ok", 1, 2), ("ok", 1, 2)]
    # the entry comes back to the same worker (claimed again: a lost reply, a backlog):
    # a new epoch, and session.started found by its event key, not recorded twice
    again = await _claim(log, 2, entries, "w1")
    assert [(c.verdict, c.epoch, c.started, c.last_seq) for c in again] == [
        ("ok", 2, -2, 2), ("ok", 2, -2, 2)]
    for _, sid in entries:
        await _hosted_by(log, sid, "w1", 2)
        assert await log.redis.xlen(log.keys.session(sid).stream) == 2
    # another worker with a live lease in the way: held, nothing bumped
    stream = log.keys.dispatch(2)
    await log.redis.xclaim(stream, GROUP, "w3", 0, [entries[0][0]], justid=True)
    held = await _claim(log, 2, entries[:1], "w3")
    assert [(c.verdict, c.detail) for c in held] == [("held", "w1")]
    await _hosted_by(log, entries[0][1], "w1", 2)
