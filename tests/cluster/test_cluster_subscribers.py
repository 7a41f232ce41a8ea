"""Subscribers on a 3-master cluster: the feeds of every master read per node by SQL
persistence (SQLite and PostgreSQL) and the projector, complete and gap-free, while appends
run; Retention trims session streams (SCAN on every master) and feeds (per slot)."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest
from group_support import eventually, sessions_per_master
from subscriber_helpers import PG_URL, fast

from eventcore import Envelope, EventLog
from eventcore.subscribers import Persistence, Projector, Retention, SubscriberRunner, read_view
from eventcore.testing._server import LocalCluster
from eventcore.testing.invariants import check_log, read_all


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    return PG_URL


async def _fill(log: EventLog, sessions: list[str], events: int, tag: str) -> None:
    for sid in sessions:
        await log.append_many([Envelope(type="message", session_id=sid, payload={tag: i})
                               for i in range(events)])


async def test_persistence_and_projector_complete_and_gap_free_on_every_master(
    redis_cluster: LocalCluster, cluster_event_log: EventLog, db_url: str
) -> None:
    log = cluster_event_log
    by_master = sessions_per_master(redis_cluster, log, 3, f"p{uuid.uuid4().hex[:6]}")
    sessions = [s for group in by_master.values() for s in group]
    for sid in sessions:
        await log.create_session(session_id=sid)
    await _fill(log, sessions, 5, "before")
    async with Persistence(log, db_url, prefix=f"t{uuid.uuid4().hex[:10]}_") as p:
        try:
            projector = Projector(log)
            async with SubscriberRunner(log, p, **fast()) as persisting, \
                    SubscriberRunner(log, projector, **fast()) as projecting:
                # the runners read live (per node) while more is appended on every master
                async with anyio.create_task_group() as tg:
                    for i in range(3):
                        tg.start_soon(_fill, log, sessions, 7, f"live{i}")
                tops = {sid: (await log.get_session(sid)).last_seq for sid in sessions}
                assert all(top == 1 + 5 + 21 for top in tops.values())

                async def caught_up() -> bool:
                    marks = await p.watermarks(sessions)
                    views = [await read_view(log, sid) for sid in sessions]
                    return (all(marks.get(s) == tops[s] for s in sessions)
                            and all(v is not None and v.last_seq == tops[v.session_id]
                                    for v in views))

                await eventually(caught_up)
                assert persisting.metrics.dead_lettered == 0
                assert projecting.metrics.dead_lettered == 0
            for sid in sessions:
                events = await read_all(log, sid)
                check_log(events)
                stored = list(await p.read(sid, 0, 1000))
                assert stored == events  # every seq once, in order, nothing missing
                assert [e.seq for e in stored] == list(range(1, tops[sid] + 1))
        finally:
            await p.drop_tables()


async def test_retention_trims_on_every_master(
    redis_cluster: LocalCluster, cluster_event_log: EventLog, tmp_path: Path
) -> None:
    log = cluster_event_log
    by_master = sessions_per_master(redis_cluster, log, 2, f"r{uuid.uuid4().hex[:6]}")
    sessions = [s for group in by_master.values() for s in group]
    for sid in sessions:
        await log.create_session(session_id=sid)
    await _fill(log, sessions, 9, "x")
    async with Persistence(log, f"sqlite+aiosqlite:///{tmp_path / 'h.db'}") as p:
        await SubscriberRunner(log, p, **fast()).drain()
        full = {sid: await read_all(log, sid) for sid in sessions}
        report = await Retention(log, p, hot_window_s=0).run_once()
        # the session streams of every master were found (SCAN runs on each master) and
        # trimmed to what the archive holds
        assert report.sessions_scanned >= len(sessions)
        assert report.session_entries_trimmed >= 10 * len(sessions)
        for sid in sessions:
            assert await log.redis.xlen(log.keys.session(sid).stream) == 0
        # the feeds below what the group acknowledged: one entry kept per feed (the floor)
        assert report.feed_entries_trimmed > 0
        for shard in log.keys.all_shards():
            assert await log.redis.xlen(log.keys.feed(shard)) <= 1
        log.archive = p
        try:
            for sid in sessions:  # tiered replay covers the trim
                assert await read_all(log, sid) == full[sid]
        finally:
            log.archive = None
