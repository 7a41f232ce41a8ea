"""The consumer-group runtime (eventcore._groups) against a real Redis: spans and per-shard
reads, the trim floor over every group of a stream, NOGROUP recovery from the checkpoint, the
reclaim (fenced or not, with or without a delivery limit) and the delivery it can give back."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from eventcore import CorruptEntry, Envelope, EventLog
from eventcore._codec import feed_parts, fields_of
from eventcore._groups import ConsumerGroup
from eventcore._lifetime import Running
from eventcore._redis import is_cluster
from eventcore._streams import ShardStreams, id_key, id_pred, spans
from eventcore.errors import RedisError, UsageError


def _group(log: EventLog, group: str = "g", consumer: str = "c", **kw: object
           ) -> ConsumerGroup:
    streams = ShardStreams(log.redis, log.keys.feed, log.keys.all_shards())
    return ConsumerGroup(streams, log.keys, group, consumer, **kw)  # type: ignore[arg-type]


async def _fill(log: EventLog, shard: int, n: int) -> list[str]:
    return [(await log.redis.xadd(log.keys.feed(shard), {"i": str(i)})).decode()
            for i in range(n)]


def test_entry_ids_order_numerically_and_have_predecessors() -> None:
    assert sorted(["10-0", "9-5", "9-10"], key=id_key) == ["9-5", "9-10", "10-0"]
    assert id_pred("5-3") == "5-2"
    assert id_key(id_pred("5-0")) < id_key("5-0") and id_pred("0-0") == "0-0"


def test_one_span_covers_every_shard_and_shares_the_count() -> None:
    (span,) = spans([0, 1, 2], lambda s: f"feed{s}")
    assert span.streams == ("feed0", "feed1", "feed2")
    assert span.shard_of("feed2") == 2
    assert (span.share(7), span.share(1), span.share(300)) == (3, 1, 100)


async def test_read_takes_at_most_count_per_shard_and_ack_settles(event_log: EventLog) -> None:
    g = _group(event_log)
    assert sorted(await g.ensure()) == list(event_log.keys.all_shards())
    assert await g.ensure() == []  # BUSYGROUP: already there
    ids = {s: await _fill(event_log, s, 5) for s in (0, 3)}
    got = await g.read(2, None)
    assert sorted((s, i) for s, i, _ in got) == sorted(
        (s, i) for s in (0, 3) for i in ids[s][:2])
    await g.ack({s: [i for t, i, _ in got if t == s] for s in (0, 3)})
    states = {st.shard: st for st in await g.state()}
    assert (states[0].pending, states[0].lag, states[0].last_delivered) == (0, 3, ids[0][1])


async def test_the_floor_is_what_the_slowest_group_still_needs(event_log: EventLog) -> None:
    log = event_log
    fast, slow = _group(log, "fast"), _group(log, "slow")
    feeds = fast.streams
    assert (await feeds.floors())[0] is None  # no stream, no group: left alone
    await fast.ensure()
    await slow.ensure()
    ids = await _fill(log, 0, 6)
    for _ in range(3):  # fast: all read and acknowledged
        got = await fast.read(10, None)
        await fast.ack({0: [i for _, i, _ in got]})
    got = await slow.read(4, None)  # slow: four read, the first two acknowledged
    await slow.ack({0: [ids[0], ids[1]]})
    floors = await feeds.floors()
    assert floors[0] == ids[2]  # the oldest entry slow has pending stays
    assert (await feeds.floors(require=["fast", "audit"]))[0] is None
    trimmed = await feeds.trim()
    assert trimmed[0] == 2 and trimmed[1] == 0
    left = [e.decode() for e, _ in await log.redis.xrange(log.keys.feed(0))]
    assert left == ids[2:]
    await slow.ack({0: [ids[2], ids[3]]})  # nothing pending: the last delivered one is kept
    assert (await feeds.floors())[0] == ids[3]


async def test_a_trim_floor_becomes_the_checkpoint_a_lost_group_restarts_from(
    event_log: EventLog,
) -> None:
    log = event_log
    recovered: list[list[int]] = []

    async def on_recovered(shards: list[int]) -> None:
        recovered.append(shards)

    g = _group(log, on_recovered=on_recovered)
    await g.ensure()
    ids = await _fill(log, 1, 4)
    got = await g.read(10, None)
    await g.ack({1: [i for _, i, _ in got]})
    await g.trim()
    assert g.checkpoints[1] == ids[-1]
    await log.redis.xgroup_destroy(log.keys.feed(1), "g")
    later = await _fill(log, 1, 2)
    with pytest.raises(RedisError) as caught:
        await g.read(10, None)
    assert await g.recovered(caught.value)
    assert recovered == [[1]] and g.recoveries == 1
    got = await g.read(10, None)  # only what came after the checkpoint, nothing twice
    assert [i for _, i, _ in got] == later
    assert not await g.recovered(RedisError("something else"))


async def test_reclaim_fenced_with_a_delivery_limit_dead_letters_in_the_same_step(
    event_log: EventLog,
) -> None:
    log = event_log
    ghost, me = _group(log, consumer="ghost"), _group(log, consumer="me")
    await ghost.ensure()
    ids = await _fill(log, 2, 3)
    await ghost.read(10, None)
    await log.redis.xclaim(log.keys.feed(2), "g", "ghost", 0, [ids[0]])  # 2 deliveries
    await log.redis.set(log.keys.reclaim_lock("g", 2), "other", px=60_000)
    fenced = await me.reclaim(2, cursor="0-0", min_idle_ms=0, count=10, lease_ms=5000,
                              max_deliveries=1)
    assert (fenced.held, fenced.claimed, fenced.dead) == (False, (), 0)
    await log.redis.delete(log.keys.reclaim_lock("g", 2))
    step = await me.reclaim(2, cursor="0-0", min_idle_ms=0, count=10, lease_ms=5000,
                            max_deliveries=2)
    assert step.held and step.dead == 1 and step.cursor == "0-0"
    assert [(c.entry_id, c.deliveries) for c in step.claimed] == [(ids[1], 2), (ids[2], 2)]
    assert await log.redis.get(log.keys.reclaim_lock("g", 2)) == b"me"
    ((_, record),) = await log.redis.xrange(log.keys.dead(2))
    assert (record[b"kind"], record[b"entry"].decode(), record[b"deliveries"]) == (
        b"subscriber", ids[0], b"2")
    await me.release_leases()
    assert await log.redis.get(log.keys.reclaim_lock("g", 2)) is None


async def test_unfenced_reclaim_leaves_the_limit_to_the_caller_who_can_give_it_back(
    event_log: EventLog,
) -> None:
    log = event_log
    ghost, me = _group(log, consumer="ghost"), _group(log, consumer="me", kind="worker")
    await ghost.ensure()
    (eid,) = await _fill(log, 0, 1)
    await ghost.read(10, None)
    for _ in range(3):
        await log.redis.xclaim(log.keys.feed(0), "g", "ghost", 0, [eid])
    step = await me.reclaim(0, cursor="0-0", min_idle_ms=0, count=10, max_deliveries=0)
    assert [(c.entry_id, c.deliveries) for c in step.claimed] == [(eid, 5)]
    assert await log.redis.xlen(log.keys.dead(0)) == 0
    assert await me.touch({0: [eid]}, uncount=True) == 1  # alive after all: not a delivery
    assert await ghost.touch({0: [eid]}) == 0  # not the ghost's any more
    (entry,) = await log.redis.xpending_range(log.keys.feed(0), "g", eid, eid, 1)
    assert (entry["consumer"], entry["times_delivered"]) == (b"me", 4)


class _Service(Running):
    def __init__(self) -> None:
        self.ready = False
        self.closed = anyio.Event()

    async def run(self, *, task_status: object = anyio.TASK_STATUS_IGNORED) -> None:
        await anyio.lowlevel.checkpoint()
        self.ready = True
        task_status.started()  # type: ignore[attr-defined]
        await self.closed.wait()

    async def aclose(self) -> None:
        self.closed.set()


async def test_a_running_part_is_ready_on_entry_and_stopped_on_exit() -> None:
    part = _Service()
    async with part as entered:
        assert entered is part and part.ready
        with pytest.raises(UsageError):
            await part.__aenter__()
    assert part.closed.is_set()


async def test_a_read_with_pairs_gives_the_fields_as_redis_sent_them(event_log: EventLog) -> None:
    """``read(pairs=True)`` (the subscribers' hot path) reads the same entries as a plain read,
    each one's fields as Redis's flat [field, value, ...] list on a single node instead of a
    dict; ``feed_parts`` decodes either alike (the append script's own layouts by position,
    any other through a dict), and a read that finds nothing returns nothing."""
    log = event_log
    plain, paired = _group(log, "plain"), _group(log, "paired")
    await plain.ensure()
    await paired.ensure()
    s = await log.create_session("a")
    await log.append_many([
        Envelope(type="message", session_id=s.session_id, payload={"i": 1}),
        Envelope(type="message", session_id=s.session_id, payload={"i": 2},
                 server_data={"secret": True}),
    ])
    await _fill(log, 1, 2)  # not feed entries: neither layout
    want = await plain.read(100, None)
    got = await paired.read(100, None, pairs=True)
    # flat lists on a single node; a cluster client's reads still build dicts
    flat = list if not is_cluster(log.redis) else dict
    assert len(want) == 5 and all(isinstance(f, flat) for _, _, f in got)
    assert [(sh, fields_of(f)) for sh, _, f in got] == [(sh, f) for sh, _, f in want]
    for (_, _, d), (_, _, f) in zip(want, got, strict=True):
        if b"sid" in d:
            assert feed_parts(f) == feed_parts(d)
        else:
            with pytest.raises(CorruptEntry):
                feed_parts(f)
    assert await paired.read(100, 5, pairs=True) == []


def test_feed_parts_reads_every_layout_of_a_flat_list_as_of_a_dict() -> None:
    """The two layouts read by position and every other (server data, a blob, fields in
    another order, something missing) read through a dict give the same as the dict."""
    body = b'{"seq":3,"type":"message","session_id":"s1","ts":"2026-01-01T00:00:00Z"}'
    layouts = [
        [b"sid", b"s1", b"seq", b"3", b"inc", b"7", b"t", b"message", b"d", body],
        [b"sid", b"s1", b"seq", b"3", b"t", b"message", b"d", body],
        [b"sid", b"s1", b"seq", b"3", b"inc", b"7", b"t", b"message", b"d", body,
         b"sd", b'{"k":1}'],
        [b"sid", b"s1", b"seq", b"3", b"t", b"message", b"d", body, b"r", b"1"],
        [b"t", b"message", b"d", body, b"seq", b"3", b"sid", b"s1"],
    ]
    for flat in layouts:
        assert feed_parts(flat) == feed_parts(fields_of(flat))
    for broken in ([b"sid", b"s2", b"seq", b"3", b"t", b"message", b"d", body],
                   [b"sid", b"s1", b"seq", b"x", b"t", b"message", b"d", body],
                   [b"sid", b"s1", b"t", b"message", b"d", body]):
        with pytest.raises(CorruptEntry):
            feed_parts(broken)
        with pytest.raises(CorruptEntry):
            feed_parts(fields_of(broken))
