"""Retention: session streams only below the persisted watermark and past the hot window;
feeds only below what every group acknowledged. Nothing unacknowledged is ever trimmed."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import anyio
from subscriber_helpers import Recorder, all_keys, fast, populate

from eventcore import Envelope, EventLog, load_settings
from eventcore.server._system import builtin_subscribers
from eventcore.subscribers import Delivery, Persistence, Retention, SubscriberRunner
from eventcore.testing.invariants import check_log, read_all


async def stream_seqs(log: EventLog, sid: str) -> list[int]:
    entries = await log.redis.xrange(log.keys.session(sid).stream)
    return [int(eid.decode().split("-")[1]) for eid, _ in entries]


async def feed_ids(log: EventLog) -> set[tuple[int, str]]:
    out = set()
    for shard in log.keys.all_shards():
        out |= {(shard, eid.decode()) for eid, _ in await log.redis.xrange(log.keys.feed(shard))}
    return out


async def test_sessions_trimmed_only_below_the_watermark_after_the_hot_window(
    event_log: EventLog, sqlite_url: str
) -> None:
    async with Persistence(event_log, sqlite_url) as p:
        last = await populate(event_log, 3, 10)
        sid = next(iter(last))
        await SubscriberRunner(event_log, p, **fast()).drain()
        # More events for one session that persistence has not stored yet.
        await event_log.append_many([Envelope(type="message", session_id=sid, payload=i)
                                     for i in range(5)])
        full = await read_all(event_log, sid)

        hot = await Retention(event_log, p, hot_window_s=3600).run_once()
        assert hot.session_entries_trimmed == 0  # everything is younger than the window
        assert await stream_seqs(event_log, sid) == list(range(1, len(full) + 1))

        report = await Retention(event_log, p, hot_window_s=0).run_once()
        assert report.sessions_scanned == 3
        assert report.session_entries_trimmed == sum(last.values())
        # Only what persistence holds left Redis; the unpersisted tail stays.
        assert await stream_seqs(event_log, sid) == list(range(last[sid] + 1, len(full) + 1))
        for other in set(last) - {sid}:
            assert await stream_seqs(event_log, other) == []
        event_log.archive = p
        try:
            assert await read_all(event_log, sid) == full  # tiered replay covers the trim
            check_log(full)
        finally:
            event_log.archive = None


async def test_feed_trimmed_only_below_what_every_group_acked(
    event_log: EventLog, tmp_path: Path
) -> None:
    fast_group = SubscriberRunner(event_log, Recorder("fast"), **fast())
    slow_group = SubscriberRunner(event_log, Recorder("slow"), **fast())
    await fast_group.ensure_groups()
    await slow_group.ensure_groups()
    last = await populate(event_log, 4, 6)
    await fast_group.drain()
    # "slow" takes everything but acknowledges nothing yet.
    pending: dict[int, list[str]] = {}
    for shard in event_log.keys.all_shards():
        got = await event_log.redis.xreadgroup("slow", "c", {event_log.keys.feed(shard): ">"},
                                               count=1000)
        pending[shard] = [eid.decode() for _, es in got for eid, _ in es]
    before = await feed_ids(event_log)
    assert len(before) == len(all_keys(last))

    async with Persistence(event_log, f"sqlite+aiosqlite:///{tmp_path / 'h.db'}") as p:
        retention = Retention(event_log, p, hot_window_s=0)
        report = await retention.run_once()
        assert report.feed_entries_trimmed == 0
        assert await feed_ids(event_log) == before  # every pending entry is still there
        # "slow" acks the first half of each shard's entries.
        for shard, ids in pending.items():
            if ids:
                await event_log.redis.xack(event_log.keys.feed(shard), "slow",
                                           *ids[: len(ids) // 2])
        report = await retention.run_once()
        left = await feed_ids(event_log)
        still_pending = {(s, i) for s, ids in pending.items() for i in ids[len(ids) // 2:]}
        assert still_pending <= left  # nothing unacknowledged was trimmed
        assert report.feed_entries_trimmed == len(before) - len(left) > 0
        # A group that must see everything but does not exist yet blocks trimming.
        strict = Retention(event_log, p, hot_window_s=0, groups=["fast", "slow", "audit"])
        for shard, ids in pending.items():
            if ids:
                await event_log.redis.xack(event_log.keys.feed(shard), "slow", *ids)
        report = await strict.run_once()
        assert report.feed_entries_trimmed == 0
        assert sorted(report.feeds_skipped) == list(event_log.keys.all_shards())
        report = await retention.run_once()
        assert len(await feed_ids(event_log)) <= len(event_log.keys.all_shards())


async def test_feed_without_groups_is_left_alone(event_log: EventLog, sqlite_url: str) -> None:
    await populate(event_log, 2, 3)
    before = await feed_ids(event_log)
    async with Persistence(event_log, sqlite_url) as p:
        report = await Retention(event_log, p, hot_window_s=0).run_once()
    assert report.feed_entries_trimmed == 0 and await feed_ids(event_log) == before


async def test_retention_runs_periodically_as_a_task(event_log: EventLog, sqlite_url: str) -> None:
    async with Persistence(event_log, sqlite_url) as p:
        (sid, top), = (await populate(event_log, 1, 5)).items()
        log = await read_all(event_log, sid)
        await p.handle([Delivery("0-1", 0, e) for e in log])
        async with Retention(event_log, p, hot_window_s=0, interval_s=0.01) as r:
            with anyio.fail_after(10):
                first = await r.next_pass()
                second = await r.next_pass()
        assert first.session_entries_trimmed == top == len(log)
        assert second.session_entries_trimmed == 0
        assert await stream_seqs(event_log, sid) == []


async def test_serve_takes_the_hot_window_and_interval_from_the_settings(
    redis_url: str, tmp_path: Path
) -> None:
    """``eventcore serve`` composes retention from EVENTCORE_HOT_WINDOW_S and
    EVENTCORE_RETENTION_INTERVAL_S: with a zero window, persisted history leaves Redis."""
    settings = load_settings(redis_url=redis_url, namespace=f"t{uuid.uuid4().hex[:12]}",
                             data_dir=tmp_path, hot_window_s=0, retention_interval_s=0.05)
    async with EventLog(settings) as log:
        (sid, top), = (await populate(log, 1, 5)).items()
        full = await read_all(log, sid)
        async with builtin_subscribers(SimpleNamespace(log=log)):  # type: ignore[arg-type]
            with anyio.fail_after(20):
                while await stream_seqs(log, sid):  # noqa: ASYNC110 - trimmed state, no event
                    await anyio.sleep(0.05)
            assert await read_all(log, sid) == full  # from the archive now
    assert len(full) == top


async def test_dead_letters_are_kept_for_a_while_and_up_to_a_count(
    event_log: EventLog, sqlite_url: str
) -> None:
    log = event_log
    dead = log.keys.dead(0)
    now_ms = int(time.time() * 1000)
    old = [f"{now_ms - 3_600_000 - i}-0" for i in (3, 2, 1)]  # an hour old (oldest first)
    new = [f"{now_ms - 1000 + i}-0" for i in range(5)]
    for eid in old + new:
        await log.redis.xadd(dead, {"sid": "s", "error": "{}"}, id=eid)
    other = log.keys.dead(1)
    await log.redis.xadd(other, {"sid": "t", "error": "{}"}, id=new[0])
    async with Persistence(log, sqlite_url) as p:
        keep_all = Retention(log, p, dead_letter_max_age_s=None, dead_letter_maxlen=None)
        assert (await keep_all.run_once()).dead_letters_trimmed == 0
        report = await Retention(log, p, dead_letter_max_age_s=1800,
                                 dead_letter_maxlen=3).run_once()
    left = [eid.decode() for eid, _ in await log.redis.xrange(dead)]
    assert left == new[-3:]  # the hour-old ones by age, then the oldest beyond 3 by count
    assert report.dead_letters_trimmed == 5
    assert await log.redis.xlen(other) == 1


async def test_a_recreated_session_is_not_trimmed_by_its_predecessors_archive(
    event_log: EventLog, sqlite_url: str
) -> None:
    """The id expired (or was deleted) and created again: the archived rows are of the old
    session and say nothing about what the new stream's seqs hold."""
    sid = f"reused-{uuid.uuid4().hex[:8]}"
    await event_log.create_session(session_id=sid)
    await event_log.append_many([Envelope(type="message", session_id=sid, payload={"old": i})
                                 for i in range(8)])
    await event_log.end_session(sid)
    async with Persistence(event_log, sqlite_url) as p:
        await SubscriberRunner(event_log, p, **fast()).drain()  # the old session, archived
        await event_log.redis.delete(*event_log.keys.session(sid).per_session)  # TTL ran out
        await event_log.create_session(session_id=sid)
        await event_log.append_many([Envelope(type="message", session_id=sid,
                                              payload={"new": i}) for i in range(3)])
        report = await Retention(event_log, p, hot_window_s=0).run_once()
        assert report.session_entries_trimmed == 0
        assert await stream_seqs(event_log, sid) == [1, 2, 3, 4]
        await SubscriberRunner(event_log, p, **fast()).drain()  # now the new one is archived
        report = await Retention(event_log, p, hot_window_s=0).run_once()
        assert report.session_entries_trimmed == 4 and await stream_seqs(event_log, sid) == []
        event_log.archive = p
        try:
            new = await read_all(event_log, sid)
        finally:
            event_log.archive = None
    assert [e.payload for e in new[1:]] == [{"new": i} for i in range(3)]
