"""The consumer-group runtime against a real Redis: groups, acks, sharing, reclaim, fencing,
dead letters, NOGROUP recovery, graceful stop, metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence

import anyio
import pytest
from subscriber_helpers import Recorder, all_keys, fast, populate

from eventcore import EventLog
from eventcore._codec import DeadLetterRecord, decode_dead_letter
from eventcore.subscribers import Delivery, SubscriberRunner


async def feed_groups(log: EventLog) -> dict[int, list[str]]:
    out = {}
    for shard in log.keys.all_shards():
        groups = await log.redis.xinfo_groups(log.keys.feed(shard))
        out[shard] = [g["name"].decode() for g in groups]
    return out


async def dead_letters(log: EventLog) -> list[dict[str, str]]:
    out = []
    for shard in log.keys.all_shards():
        for _, fields in await log.redis.xrange(log.keys.dead(shard)):
            out.append({k.decode(): v.decode(errors="replace") for k, v in fields.items()})
    return out


async def decoded_dead_letters(log: EventLog) -> list[DeadLetterRecord]:
    out = []
    for shard in log.keys.all_shards():
        for eid, fields in await log.redis.xrange(log.keys.dead(shard)):
            rec = decode_dead_letter(eid, fields)
            assert rec is not None
            out.append(rec)
    return out


async def ghost_read(log: EventLog, group: str, consumer: str = "ghost") -> list[tuple[int, str]]:
    """Read every new entry as a consumer that then dies (never acks)."""
    taken = []
    for shard in log.keys.all_shards():
        got = await log.redis.xreadgroup(group, consumer, {log.keys.feed(shard): ">"}, count=10_000)
        for _, entries in got or ():
            taken += [(shard, eid.decode()) for eid, _ in entries]
    return taken


async def test_ready_only_once_groups_exist_on_every_shard(event_log: EventLog) -> None:
    feeds = [event_log.keys.feed(s) for s in event_log.keys.all_shards()]
    assert await event_log.redis.exists(*feeds) == 0
    async with SubscriberRunner(event_log, Recorder(), **fast()):
        groups = await feed_groups(event_log)
    assert groups == {s: ["rec"] for s in event_log.keys.all_shards()}


async def test_handles_everything_once_and_acks(event_log: EventLog) -> None:
    last = await populate(event_log, 6, 20)
    rec = Recorder()
    runner = SubscriberRunner(event_log, rec, batch=7, **fast())
    assert await runner.drain() == len(all_keys(last))
    assert sorted(rec.keys) == sorted(all_keys(last))
    m = await runner.refresh_metrics()
    assert (m.lag, m.pending, m.acked, m.dead_lettered) == (0, 0, len(rec.got), 0)
    # in feed order per session
    for sid in last:
        seqs = [d.seq for d in rec.got if d.session_id == sid]
        assert seqs == sorted(seqs)
    assert await runner.drain() == 0  # nothing is delivered twice once acked


async def test_instances_share_work_and_groups_each_see_everything(event_log: EventLog) -> None:
    b_started = anyio.Event()

    class Waits(Recorder):
        async def handle(self, deliveries: Sequence[Delivery]) -> None:
            if not self.got:  # hold the first batch until the other instance has work too
                with anyio.fail_after(20):
                    await b_started.wait()
            await super().handle(deliveries)

    class Signals(Recorder):
        async def handle(self, deliveries: Sequence[Delivery]) -> None:
            await super().handle(deliveries)
            b_started.set()

    a, b, other = Waits("shared"), Signals("shared"), Recorder("other")
    async with (
        SubscriberRunner(event_log, a, batch=3, **fast()) as ra,
        SubscriberRunner(event_log, b, batch=3, **fast()) as rb,
        SubscriberRunner(event_log, other, **fast()) as ro,
    ):
        last = await populate(event_log, 8, 10)
        want = len(all_keys(last))
        with anyio.fail_after(30):
            await ro.wait_until(lambda m: m.acked >= want)
            # wait_until re-checks on every batch and every metrics tick of ra
            await ra.wait_until(lambda m: m.acked + rb.metrics.acked >= want)
    assert a.got and b.got, "both instances of the group got work"
    assert not set(a.keys) & set(b.keys), "an entry went to both instances of one group"
    assert set(a.keys) | set(b.keys) == all_keys(last)
    assert sorted(other.keys) == sorted(all_keys(last))


async def test_poison_entry_is_dead_lettered_and_the_rest_flows(event_log: EventLog) -> None:
    last = await populate(event_log, 4, 10)
    bad_sid = next(iter(last))
    rec = Recorder(fail=lambda d: d.session_id == bad_sid and d.seq == 5)
    runner = SubscriberRunner(event_log, rec, max_deliveries=3, **fast())
    await runner.drain()
    assert set(rec.keys) == all_keys(last) - {(bad_sid, 5)}
    dead = await dead_letters(event_log)
    assert len(dead) == 1
    d = dead[0]
    assert (d["group"], d["f.sid"], d["f.seq"], d["deliveries"]) == ("rec", bad_sid, "5", "3")
    assert json.loads(d["error"])["message"] == f"poison: {bad_sid} seq 5"
    (rec_,) = await decoded_dead_letters(event_log)  # the one decoder reads it
    assert (rec_.kind, rec_.group, rec_.attempts, rec_.error.message) == (
        "subscriber", "rec", 3, f"poison: {bad_sid} seq 5")
    assert rec_.fields is not None and rec_.fields[b"sid"] == bad_sid.encode()
    m = await runner.refresh_metrics()
    assert (m.dead_lettered, m.pending, m.lag) == (1, 0, 0)
    assert m.failures == 3 and m.redeliveries == 2


async def test_undecodable_entries_are_dead_lettered(event_log: EventLog) -> None:
    last = await populate(event_log, 2, 3)
    feed = event_log.keys.feed(0)
    await SubscriberRunner(event_log, Recorder(), **fast()).ensure_groups()
    await event_log.redis.xadd(feed, {"sid": "x", "seq": "1", "t": "message", "d": "{not json"})
    await event_log.redis.xadd(feed, {"garbage": "\xff\x00"})
    await event_log.redis.xadd(feed, {"sid": "x", "seq": "2", "t": "m",
                                      "d": '{"seq":3,"type":"m","session_id":"y"}'})
    rec = Recorder()
    runner = SubscriberRunner(event_log, rec, **fast())
    await runner.drain()
    assert set(rec.keys) == all_keys(last)
    dead = await dead_letters(event_log)
    assert len(dead) == 3
    assert {json.loads(d["error"])["type"] for d in dead} == {"CorruptEntry"}
    assert all(json.loads(d["error"])["retryable"] is False for d in dead)
    assert (await runner.refresh_metrics()).pending == 0


async def test_entries_of_a_dead_consumer_are_reclaimed(event_log: EventLog) -> None:
    rec = Recorder()
    runner = SubscriberRunner(event_log, rec, **fast(claim_idle_ms=100, claim_interval_ms=20))
    await runner.ensure_groups()
    last = await populate(event_log, 3, 5)
    taken = await ghost_read(event_log, "rec")
    assert len(taken) == len(all_keys(last))
    async with runner:
        with anyio.fail_after(20):
            await runner.wait_until(lambda m: m.acked >= len(taken))
    assert sorted(rec.keys) == sorted(all_keys(last))
    assert runner.metrics.reclaimed == len(taken)
    assert {d.attempt for d in rec.got} == {2}
    assert (await runner.refresh_metrics()).pending == 0


async def test_reclaim_dead_letters_entries_past_the_delivery_limit(event_log: EventLog) -> None:
    rec = Recorder()
    runner = SubscriberRunner(event_log, rec, max_deliveries=3, **fast(claim_idle_ms=1))
    await runner.ensure_groups()
    last = await populate(event_log, 1, 2)
    taken = await ghost_read(event_log, "rec")
    victim_shard, victim = taken[-1]
    for _ in range(3):  # three more deliveries to consumers that die: 4 in all
        await event_log.redis.xclaim(event_log.keys.feed(victim_shard), "rec", "ghost2", 0,
                                     [victim])
    await runner.drain()
    dead = await dead_letters(event_log)
    assert [(d["entry"], d["deliveries"]) for d in dead] == [(victim, "4")]
    assert json.loads(dead[0]["error"])["type"] == "DeliveryLimit"
    # reclaim.lua writes the same record shape as the runtime's dead_letter
    (rec_,) = await decoded_dead_letters(event_log)
    assert (rec_.kind, rec_.entry, rec_.attempts, rec_.error.type) == (
        "subscriber", victim, 4, "DeliveryLimit")
    assert len(rec.got) == len(all_keys(last)) - 1
    assert (await runner.refresh_metrics()).pending == 0


async def test_reclaim_is_fenced_by_a_lease_that_expires(event_log: EventLog) -> None:
    rec = Recorder()
    runner = SubscriberRunner(event_log, rec, **fast(claim_idle_ms=1))
    await runner.ensure_groups()
    await populate(event_log, 2, 3)
    taken = await ghost_read(event_log, "rec")
    for shard in event_log.keys.all_shards():  # another reclaimer holds every shard's lease
        await event_log.redis.set(event_log.keys.reclaim_lock("rec", shard), "other", px=60_000)
    await runner.drain()
    assert rec.got == [] and runner.metrics.reclaimed == 0
    for shard in event_log.keys.all_shards():  # ... and then dies: its lease runs out
        await event_log.redis.pexpire(event_log.keys.reclaim_lock("rec", shard), 1)
    await anyio.sleep(0.01)  # the lease's expiry is wall-clock time in Redis
    await runner.drain()
    assert len(rec.got) == len(taken)
    holders = {await event_log.redis.get(event_log.keys.reclaim_lock("rec", s))
               for s in event_log.keys.all_shards()}
    assert holders == {None}  # released when the drain ended


async def test_lost_group_is_recreated_from_checkpoint_not_dollar(event_log: EventLog) -> None:
    first = await populate(event_log, 3, 4)
    rec = Recorder()
    runner = SubscriberRunner(event_log, rec, **fast())
    await runner.drain()  # a drain leaves the checkpoint where it got to
    checkpoints = {s: await event_log.redis.get(event_log.keys.checkpoint("rec", s))
                   for s in event_log.keys.all_shards()}
    assert all(checkpoints.values())
    feeds = [event_log.keys.feed(s) for s in event_log.keys.all_shards()]
    for feed in feeds:
        await event_log.redis.xgroup_destroy(feed, "rec")
    second = await populate(event_log, 3, 4)  # appended while the group does not exist
    await runner.drain()  # the group is recreated at start, from the checkpoint
    assert sorted(rec.keys) == sorted(all_keys(first) | all_keys(second))  # none lost or twice
    # Lost while the runner is blocked reading: NOGROUP, recovered from the checkpoint.
    base = runner.metrics.acked
    async with runner:
        for feed in feeds:
            await event_log.redis.xgroup_destroy(feed, "rec")
        third = await populate(event_log, 3, 4)
        with anyio.fail_after(20):
            await runner.wait_until(lambda m: m.acked >= base + len(all_keys(third)))
    assert runner.metrics.nogroup_recoveries >= 1
    assert sorted(rec.keys) == sorted(all_keys(first) | all_keys(second) | all_keys(third))


class Gated(Recorder):
    """Sets ``entered`` in its first batch and handles it once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = anyio.Event(), anyio.Event()

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        self.entered.set()
        await self.release.wait()
        await super().handle(deliveries)


async def test_graceful_stop_finishes_the_batch_in_hand(event_log: EventLog) -> None:
    rec = Gated()
    entered, release = rec.entered, rec.release
    runner = SubscriberRunner(event_log, rec, **fast())
    closed = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        last = await populate(event_log, 1, 5)
        with anyio.fail_after(10):
            await entered.wait()

        async def close() -> None:
            await runner.aclose()
            closed.set()

        # the read ahead, started with the batch, is done (a read in flight when the stop
        # comes completes and is handled: on a cluster its per-node round trips can still be
        # going when the entries below arrive)
        ahead = runner._ahead
        if ahead is not None:
            await ahead.done.wait()
        tg.start_soon(close)
        await anyio.wait_all_tasks_blocked()
        assert not closed.is_set()  # still finishing the batch
        await populate(event_log, 1, 3)  # arrives after the stop: must not be read
        release.set()
    assert closed.is_set()
    first_batch = {(d.session_id, d.seq) for d in rec.got}
    assert first_batch <= all_keys(last) and first_batch
    m = await runner.refresh_metrics()
    assert m.pending == 0  # the batch in hand was acknowledged
    assert m.lag is not None and m.lag >= 4  # nothing new was taken after the stop


async def test_metrics_report_lag_pending_and_latency(event_log: EventLog) -> None:
    runner = SubscriberRunner(event_log, Recorder(), **fast())
    await runner.ensure_groups()
    last = await populate(event_log, 2, 9)
    m = await runner.refresh_metrics()
    assert (m.lag, m.pending) == (len(all_keys(last)), 0)
    taken = await ghost_read(event_log, "rec")
    m = await runner.refresh_metrics()
    assert (m.lag, m.pending) == (0, len(taken))
    other = SubscriberRunner(event_log, Recorder("g2"), **fast())
    await other.drain()
    snap = other.metrics.snapshot()
    assert snap["acked"] == len(taken) and snap["batches"] >= 1
    assert set(snap["batch_latency"]) == {"last_ms", "p50_ms", "p99_ms", "max_ms"}
    json.dumps(snap)


def test_refuses_dollar_start() -> None:
    with pytest.raises(ValueError, match="skip"):
        SubscriberRunner(EventLog(redis_url="redis://127.0.0.1:1"), Recorder(), start_id="$")


async def test_heartbeat_keeps_a_slow_handlers_entries_from_being_reclaimed(
    event_log: EventLog,
) -> None:
    started = anyio.Event()

    class Slow(Recorder):
        async def handle(self, deliveries: Sequence[Delivery]) -> None:
            started.set()
            await anyio.sleep(1.6)  # the scenario: longer than claim idle and reclaim lease
            await super().handle(deliveries)

    slow, peer = Slow("shared"), Recorder("shared")
    settings = fast(claim_idle_ms=200, claim_interval_ms=20)
    async with SubscriberRunner(event_log, slow, batch=1000, **settings) as rs:
        last = await populate(event_log, 2, 5)
        with anyio.fail_after(10):
            await started.wait()
        async with SubscriberRunner(event_log, peer, **settings) as rp:
            with anyio.fail_after(20):
                await rs.wait_until(lambda m: m.acked + rp.metrics.acked >= len(all_keys(last)))
    assert rp.metrics.reclaimed == 0  # the peer reclaimed nothing the live consumer held
    assert not set(slow.keys) & set(peer.keys)
    assert set(slow.keys) | set(peer.keys) == all_keys(last)


async def consumer_pending(log: EventLog, group: str, consumer: str) -> int:
    total = 0
    for shard in log.keys.all_shards():
        rows = await log.redis.xpending_range(log.keys.feed(shard), group, "-", "+", 10_000,
                                              consumername=consumer)
        total += len(rows)
    return total


async def test_read_ahead_is_never_acked_before_it_is_handled(event_log: EventLog) -> None:
    """The next batch is read while the current one is handled; a runner cancelled mid-batch
    leaves both batches pending (nothing acknowledged early) and another consumer gets them
    all, each once."""
    entered = anyio.Event()

    class Stuck(Recorder):
        async def handle(self, deliveries: Sequence[Delivery]) -> None:
            self.calls += 1
            entered.set()
            await anyio.sleep_forever()

    last = await populate(event_log, 4, 6)
    stuck = Stuck("shared")
    runner = SubscriberRunner(event_log, stuck, consumer="stuck", batch=1,
                              drain_timeout_s=0.01, **fast(claim_idle_ms=100))
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        with anyio.fail_after(10):
            await entered.wait()
            assert runner._ahead is not None  # the next batch is being read meanwhile
            await runner._ahead.done.wait()
        in_hand = len(runner._held())
        assert in_hand > runner.metrics.delivered  # read ahead: held, not handled
        await runner.aclose()  # the batch in hand is abandoned (drain timeout)
        tg.cancel_scope.cancel()
    assert stuck.calls == 1 and runner.metrics.acked == 0
    assert await consumer_pending(event_log, "shared", "stuck") == in_hand
    peer = Recorder("shared")
    async with SubscriberRunner(event_log, peer, **fast(claim_idle_ms=100,
                                                          claim_interval_ms=20)) as rp:
        with anyio.fail_after(20):
            await rp.wait_until(lambda m: m.acked >= len(all_keys(last)))
    assert sorted(peer.keys) == sorted(all_keys(last))  # every entry, each once
    assert (await rp.refresh_metrics()).pending == 0


async def test_graceful_stop_handles_the_batch_read_ahead(event_log: EventLog) -> None:
    """A stop during a batch finishes it and the batch already read ahead (acked, not left
    pending for a reclaim), and reads nothing more."""
    rec = Gated()
    entered, release = rec.entered, rec.release
    last = await populate(event_log, 4, 6)
    runner = SubscriberRunner(event_log, rec, batch=1, **fast())
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        with anyio.fail_after(10):
            await entered.wait()
            assert runner._ahead is not None
            await runner._ahead.done.wait()
        ahead = len(runner._ahead.items)
        assert ahead > 0
        runner.stop()
        release.set()
    m = await runner.refresh_metrics()
    assert m.pending == 0 and runner.metrics.acked == len(rec.got)
    assert len(rec.got) < len(all_keys(last))  # stopped: not everything was read
    assert runner.metrics.delivered == len(rec.got) >= ahead + 1


async def test_a_batch_is_acked_while_the_next_is_handled_and_held_until_then(
    event_log: EventLog,
) -> None:
    """A handled batch's acknowledgement goes out while the next batch is handled (not one
    round trip after the other); until it is done its entries stay in the runner's hand (the
    heartbeat keeps them from looking idle, a reclaim pass skips them): every entry handled
    before is acknowledged or held, never neither. A drain ends with every entry handled
    once and acknowledged."""
    last = await populate(event_log, 4, 6)
    earlier: list[Delivery] = []
    ack_in_flight: list[bool] = []

    class Checking(Recorder):
        async def handle(self, deliveries: Sequence[Delivery]) -> None:
            held = set(runner._held())  # before the look at Redis (an ack may end meanwhile)
            ack_in_flight.append(getattr(runner, "_acking", None) is not None)
            pending = set()
            for shard in event_log.keys.all_shards():
                rows = await event_log.redis.xpending_range(
                    event_log.keys.feed(shard), "acks", "-", "+", 10_000)
                pending |= {(shard, r["message_id"].decode()) for r in rows}
            for d in earlier:
                assert (d.shard, d.entry_id) in held or (d.shard, d.entry_id) not in pending
            await super().handle(deliveries)
            earlier.extend(deliveries)

    rec = Checking("acks")
    runner = SubscriberRunner(event_log, rec, batch=1, **fast())
    assert await runner.drain() == len(all_keys(last))
    assert len(ack_in_flight) > 2
    assert ack_in_flight[0] is False and all(ack_in_flight[1:])  # the previous one's, each time
    assert sorted(rec.keys) == sorted(all_keys(last))
    m = await runner.refresh_metrics()
    assert m.pending == 0 and runner.metrics.acked == len(all_keys(last))
