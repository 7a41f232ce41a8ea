"""Persistence into SQLite and PostgreSQL, the archive behind tiered replay."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Mapping

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from subscriber_helpers import all_keys, fast, populate

from eventcore import ConfigError, Envelope, EventLog, HistoryGone, client_json
from eventcore.subscribers import SCHEMA_VERSION, Delivery, Persistence, SubscriberRunner
from eventcore.subscribers._ordered import DELETED, Position
from eventcore.testing.invariants import assert_replay_suffixes, check_log, read_all


async def stored(p: Persistence, sid: str) -> list[Envelope]:
    return list(await p.read(sid, 0, 10_000))


async def test_every_envelope_stored_once_with_server_data(
    event_log: EventLog, persistence: Persistence
) -> None:
    last = await populate(event_log, 4, 15)
    s = await event_log.create_session("a")
    await event_log.signal(s.session_id, "big", "x" * 10_000)  # summarized: value in server_data
    await event_log.append(Envelope(type="message", session_id=s.session_id, payload={"k": 1},
                                    server_data={"secret": [1, 2]}))
    runner = SubscriberRunner(event_log, persistence, **fast())
    await runner.drain()
    assert await persistence.count() == len(all_keys(last)) + 3
    for sid in [*last, s.session_id]:
        assert await stored(persistence, sid) == await read_all(event_log, sid)
    got = await stored(persistence, s.session_id)
    assert got[1].server_data == {"value": "x" * 10_000}
    assert got[1].payload["summary"]["size"] == 10_002
    assert got[2].server_data == {"secret": [1, 2]}
    # Redelivered (another group, or the same entries again): still once each.
    await SubscriberRunner(event_log, persistence, group="persistence-2", **fast()).drain()
    log = await read_all(event_log, s.session_id)
    await persistence.handle([Delivery("0-1", 0, e) for e in reversed(log)])
    assert await persistence.count() == len(all_keys(last)) + 3
    assert await persistence.watermarks([*last, "nope"]) == last
    assert persistence.stats.duplicates > 0


async def test_gap_is_filled_from_the_log(event_log: EventLog, persistence: Persistence) -> None:
    (sid, _top), = (await populate(event_log, 1, 9)).items()
    log = await read_all(event_log, sid)
    await persistence.handle([Delivery("0-1", 0, log[6])])  # only seq 7 arrives (so far)
    assert [e.seq for e in await stored(persistence, sid)] == list(range(1, 8))
    assert persistence.stats.gaps_filled == 6
    assert await persistence.watermarks([sid]) == {sid: 7}


async def test_schema_is_versioned(event_log: EventLog, db_url: str, table_prefix: str) -> None:
    p = Persistence(event_log, db_url, prefix=table_prefix)
    async with p, p.engine.begin() as conn:
        t = p.tables["schema"]
        assert (await conn.execute(sa.select(t.c.version))).scalar() == SCHEMA_VERSION
        await conn.execute(t.update().values(version=SCHEMA_VERSION + 1))
    try:
        with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}"):
            async with Persistence(event_log, db_url, prefix=table_prefix):
                pass
        async with Persistence(event_log, db_url, prefix=table_prefix + "x") as other:
            await other.drop_tables()  # another prefix is another set of tables: fine
    finally:
        engine = create_async_engine(db_url)
        async with engine.begin() as conn:
            await conn.run_sync(p.metadata.drop_all)
        await engine.dispose()


async def test_checkpoints_round_trip(persistence: Persistence) -> None:
    assert await persistence.load_checkpoint("g", 3) is None
    await persistence.save_checkpoint("g", 3, "5-1")
    await persistence.save_checkpoint("g", 3, "7-0")
    await persistence.save_checkpoint("h", 3, "1-0")
    assert await persistence.load_checkpoint("g", 3) == "7-0"
    assert await persistence.load_checkpoint("h", 3) == "1-0"


def test_default_is_sqlite_under_the_data_dir(tmp_path: object) -> None:
    log = EventLog(redis_url="redis://127.0.0.1:1", data_dir=str(tmp_path))
    assert Persistence(log).url == f"sqlite+aiosqlite:///{tmp_path}/history.sqlite3"
    with pytest.raises(ConfigError, match="postgresql"):
        Persistence(log, "mysql+aiomysql://x/y")


# -- tiered replay ---------------------------------------------------------------------------

async def test_read_continues_from_the_archive_after_a_trim(
    event_log: EventLog, persistence: Persistence
) -> None:
    (sid, _top), = (await populate(event_log, 1, 40)).items()
    await event_log.signal(sid, "status", "a")
    await event_log.signal(sid, "status", "b")
    full = await read_all(event_log, sid)
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    stream = event_log.keys.session(sid).stream
    # seqs 1..30 leave Redis
    assert await event_log.redis.xtrim(stream, minid="0-31", approximate=False) == 30
    event_log.archive = persistence
    try:
        assert await read_all(event_log, sid) == full
        assert await event_log.read(sid, 10, 5) == full[10:15]  # wholly in the archive
        assert await event_log.read(sid, 28, 5) == full[28:30]  # archive page; next from Redis
        await assert_replay_suffixes(event_log, sid, [0, 1, 29, 30, 31, len(full)])
        signals = await event_log.replay_signals(sid, 0)
        assert [e.payload["value"] for e in signals] == ["a", "b"]
        tail = [e async for e in _take(event_log.tail(sid, 25, until_ended=False), 8)]
        assert [e.seq for e in tail] == list(range(26, 34))
    finally:
        event_log.archive = None


async def _take(it: object, n: int) -> object:
    out = 0
    async for e in it:  # type: ignore[attr-defined]
        yield e
        out += 1
        if out == n:
            break


async def test_history_gone_everywhere_is_explicit(
    event_log: EventLog, persistence: Persistence
) -> None:
    (sid, top), = (await populate(event_log, 1, 20)).items()
    await persistence.handle([Delivery("0-1", 0, e) for e in (await read_all(event_log, sid))[:5]])
    stream = event_log.keys.session(sid).stream
    # 1..10 trimmed; only 1..5 archived
    await event_log.redis.xtrim(stream, minid="0-11", approximate=False)
    event_log.archive = persistence
    try:
        assert [e.seq for e in await event_log.read(sid, 0, 5)] == [1, 2, 3, 4, 5]
        with pytest.raises(HistoryGone) as caught:
            await event_log.read(sid, 5, 100)
        assert (caught.value.after, caught.value.first_available) == (5, 11)
        with pytest.raises(HistoryGone):
            async for _ in event_log.tail(sid, 3, until_ended=False):
                pass
        assert [e.seq for e in await event_log.read(sid, 10, 100)] == list(range(11, top + 1))
    finally:
        event_log.archive = None
    with pytest.raises(HistoryGone):  # no archive at all
        await event_log.read(sid, 0, 10)


async def test_expired_session_is_read_from_the_archive(
    event_log: EventLog, persistence: Persistence
) -> None:
    (sid, top), = (await populate(event_log, 1, 6)).items()
    await event_log.end_session(sid)
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    await event_log.redis.delete(*event_log.keys.session(sid).per_session)  # its TTL ran out
    assert await event_log.read(sid) == []  # without an archive: gone from Redis
    event_log.archive = persistence
    try:
        got = await read_all(event_log, sid)
    finally:
        event_log.archive = None
    check_log(got)
    assert got[-1].type == "session.ended" and len(got) == top + 1


async def test_read_only_archive_for_an_api_process(
    event_log: EventLog, persistence: Persistence, db_url: str, table_prefix: str
) -> None:
    (sid, top), = (await populate(event_log, 1, 8)).items()
    full = await read_all(event_log, sid)
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    await event_log.redis.xtrim(event_log.keys.session(sid).stream, minid="0-6",
                                approximate=False)
    async with Persistence(None, db_url, prefix=table_prefix) as archive:
        async with EventLog(event_log.settings, archive=archive) as api_log:
            assert await read_all(api_log, sid) == full
        with pytest.raises(RuntimeError, match="without a log"):
            await archive.handle([Delivery("0-1", 0, full[-1])])
    assert top == len(full)


async def test_deleted_session_is_purged_from_the_archive(
    event_log: EventLog, persistence: Persistence
) -> None:
    (sid, top), = (await populate(event_log, 1, 6)).items()
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    assert await persistence.count(sid) == top
    incarnation = (await event_log.get_session(sid)).incarnation
    late = [Delivery("0-1", 0, e, incarnation=incarnation) for e in await read_all(event_log, sid)]
    assert await event_log.delete_session(sid)
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    assert await persistence.count(sid) == 0
    event_log.archive = persistence
    try:
        assert await event_log.read(sid) == []  # nothing left anywhere
    finally:
        event_log.archive = None
    assert persistence.stats.deleted == 1
    # late redeliveries of the deleted incarnation (a reclaim, another consumer) stay out
    stale = persistence.stats.stale
    await persistence.handle(late)
    assert await persistence.count(sid) == 0 and persistence.stats.stale == stale + len(late)


@pytest.mark.parametrize("lagging", [False, True], ids=["caught-up", "lagging"])
async def test_a_recreated_session_id_keeps_only_the_new_sessions_rows(
    event_log: EventLog, persistence: Persistence, lagging: bool
) -> None:
    """The id deleted and created again (an idempotency key, a chosen session_id) is a new
    session: its rows never mix with the old one's, whether persistence had stored the old one
    already or meets both in one backlog."""
    sid = f"reused-{uuid.uuid4().hex[:8]}"
    await event_log.create_session(session_id=sid, labels={"gen": "old"})
    await event_log.append_many([Envelope(type="message", session_id=sid, payload={"old": i})
                                 for i in range(6)])
    if not lagging:
        await SubscriberRunner(event_log, persistence, **fast()).drain()
    await event_log.delete_session(sid)
    await event_log.create_session(session_id=sid, labels={"gen": "new"})
    await event_log.append(Envelope(type="message", session_id=sid, payload={"new": 1}))
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    new = await read_all(event_log, sid)
    assert [e.payload for e in new[1:]] == [{"new": 1}]
    assert await stored(persistence, sid) == new
    assert await persistence.watermarks([sid]) == {sid: 2}


async def test_a_v1_database_is_upgraded(
    event_log: EventLog, db_url: str, table_prefix: str
) -> None:
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:  # what schema version 1 created
            await conn.execute(sa.text(
                f"CREATE TABLE {table_prefix}sessions (session_id VARCHAR(128) PRIMARY KEY, "
                "last_seq BIGINT NOT NULL, updated_ms BIGINT NOT NULL)"))
            await conn.execute(sa.text(
                f"CREATE TABLE {table_prefix}schema (id INTEGER PRIMARY KEY, "
                "version INTEGER NOT NULL)"))
            await conn.execute(sa.text(f"INSERT INTO {table_prefix}schema VALUES (1, 1)"))
            await conn.execute(sa.text(
                f"INSERT INTO {table_prefix}sessions VALUES ('legacy', 7, 0)"))
        async with Persistence(event_log, db_url, prefix=table_prefix) as p:
            try:
                assert await p.watermarks(["legacy"]) == {"legacy": 7}
                async with p.engine.connect() as conn:
                    t = p.tables["schema"]
                    assert (await conn.execute(sa.select(t.c.version))).scalar() == 2
            finally:
                await p.drop_tables()
    finally:
        await engine.dispose()


async def test_rows_hold_the_feeds_json_and_blob_payloads_hydrated(
    event_log: EventLog, persistence: Persistence
) -> None:
    """A delivered envelope is stored as the JSON the feed holds (not decoded and encoded
    again), except one whose payload lives in a blob: the feed's JSON holds only the blob's
    ref, so the row holds the hydrated envelope, readable once the blob is gone."""
    s = (await event_log.create_session("a")).session_id
    big = {"text": "x" * (event_log.settings.inline_limit + 10)}
    await event_log.append(Envelope(type="message", session_id=s, payload={"k": 1},
                                    server_data={"secret": [1, 2]}))
    await event_log.append(Envelope(type="message", session_id=s, payload=big))
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    feed: dict[int, dict[bytes, bytes]] = {}
    for shard in event_log.keys.all_shards():
        for _, fields in await event_log.redis.xrange(event_log.keys.feed(shard)):
            if fields[b"sid"] == s.encode():
                feed[int(fields[b"seq"])] = fields
    t = persistence.tables["events"]
    async with persistence.engine.connect() as conn:
        rows = {seq: (env, sd) for seq, env, sd in await conn.execute(
            sa.select(t.c.seq, t.c.envelope, t.c.server_data).where(t.c.session_id == s))}
    assert sorted(rows) == [1, 2, 3]
    for seq in (1, 2):  # session.created and the small message: the feed's bytes
        assert rows[seq][0].encode() == feed[seq][b"d"]
    assert rows[2][1] is not None and rows[2][1].encode() == feed[2][b"sd"]
    assert b'"payload_ref"' in feed[3][b"d"] and b"x" * 100 not in feed[3][b"d"]
    assert b"x" * 100 in rows[3][0].encode()  # hydrated, not the bare ref
    assert await stored(persistence, s) == await read_all(event_log, s)


async def test_rows_above_the_watermark_already_stored_are_kept_once(
    event_log: EventLog, persistence: Persistence, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows past a session's watermark are not expected (each batch's rows and its watermark
    commit together), so the write may skip the conflict check; if some are there anyway (a
    row written by hand, an older version's leftovers), the batch is still stored, each
    (session, seq) once, and the watermark covers it."""
    (sid, top), = (await populate(event_log, 1, 9)).items()
    log = await read_all(event_log, sid)
    await persistence.handle([Delivery("0-1", 0, e) for e in log[:3]])
    assert await persistence.watermarks([sid]) == {sid: 3}
    t = persistence.tables["events"]
    async with persistence.engine.begin() as conn:  # seq 6 by hand, the watermark left at 3
        await conn.execute(t.insert().values(
            session_id=sid, seq=6, type="by-hand", run_id=None, event_key="k", ts_ms=0,
            envelope=client_json(log[5]).decode(), server_data=None))
    with caplog.at_level(logging.INFO, "eventcore.persistence"):
        await SubscriberRunner(event_log, persistence, **fast()).drain()
    if persistence.sql.postgres:  # COPY hit the row, the batch went through the check
        assert "through the conflict check" in caplog.text
    assert await persistence.count(sid) == top
    assert [e.seq for e in await stored(persistence, sid)] == list(range(1, top + 1))
    assert await persistence.watermarks([sid]) == {sid: top}
    async with persistence.engine.connect() as conn:
        kinds = (await conn.execute(sa.select(t.c.type).where(t.c.seq == 6))).scalars().all()
    assert kinds == ["by-hand"]  # ON CONFLICT DO NOTHING: the row there first stays


async def test_a_call_from_another_task_during_a_batch_holds_no_connection_after_it(
    event_log: EventLog, db_url: str, table_prefix: str
) -> None:
    """A batch reads its positions and writes on one pooled connection; a call made by another
    task meanwhile (an API reading watermarks, a test waiting for them) checks out a connection
    of its own and returns it: it neither shares nor replaces the batch's (a replaced one was
    left checked out, for the garbage collector to find)."""
    import anyio

    class Parked(Persistence):
        parked = anyio.Event()
        go = anyio.Event()
        first = True

        async def positions(self, session_ids: Collection[str]) -> Mapping[str, Position]:
            if self.first:  # the batch's own first look-up waits here
                self.first = False
                self.parked.set()
                await self.go.wait()
            return await super().positions(session_ids)

    (sid, top), = (await populate(event_log, 1, 5)).items()
    log = await read_all(event_log, sid)
    async with Parked(event_log, db_url, prefix=table_prefix) as p:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(p.handle, [Delivery("0-1", 0, e) for e in log])
                await p.parked.wait()
                assert await p.watermarks([sid]) == {}
                assert p.engine.pool.checkedout() == 0  # returned, not kept as the batch's
                p.go.set()
            assert await p.watermarks([sid]) == {sid: top}
            assert p.engine.pool.checkedout() == 1  # the batch's, kept for the next batch
        finally:
            await p.drop_tables()
    assert p._held is None  # given back at close


async def test_batches_in_a_row_share_one_checkout_given_back_when_idle_or_closed(
    event_log: EventLog, db_url: str, table_prefix: str
) -> None:
    """Batches that keep coming write on one connection, kept from batch to batch (a checkout
    each, with the pool's pre-ping, would cost round trips every batch); one that comes after
    ``hold_idle_s`` without a batch checks out a fresh (pinged) one, and closing gives the
    kept one back to the pool."""
    (sid, _), = (await populate(event_log, 1, 9)).items()
    log = await read_all(event_log, sid)
    checkouts = []
    async with Persistence(event_log, db_url, prefix=table_prefix) as p:
        sa.event.listen(p.engine.sync_engine, "checkout", lambda *a: checkouts.append(1))
        try:
            for n in range(0, 6, 2):
                await p.handle([Delivery(f"0-{n + i + 1}", 0, e)
                                for i, e in enumerate(log[n:n + 2])])
            assert len(checkouts) == 1
            assert p.engine.pool.checkedout() == 1
            p.hold_idle_s = 0.0  # every gap between batches is now too long to keep it
            await p.handle([Delivery("0-7", 0, log[6])])
            assert len(checkouts) == 2
            assert await p.watermarks([sid]) == {sid: 7}  # another task: its own checkout
            assert p.engine.pool.checkedout() == 1
        finally:
            await p.drop_tables()
        held = p._held
        assert held is not None
    assert p._held is None and held.closed


async def test_a_batch_mixing_incarnations_keeps_only_the_newest(persistence: Persistence) -> None:
    """One batch may carry entries of two incarnations of one session id, in any order: those
    of the older one (before or after the newer one's, a duplicate and its deletion marker
    among them) are stale, only the newest incarnation's apply; its own deletion marker
    drops what it delivered and purges it."""
    sid = "s_mixed"

    def entry(n: int, inc: str, seq: int, kind: str = "message") -> Delivery:
        env = Envelope(type=kind, session_id=sid, seq=seq, payload={"inc": inc})
        return Delivery(f"0-{n}", 0, env, 1, inc)

    await persistence.handle([entry(1, "a", 1), entry(2, "a", 2), entry(3, "a", 2),
                              entry(4, "a", 0, DELETED), entry(5, "b", 1), entry(6, "a", 3),
                              entry(7, "b", 2)])
    assert [(e.seq, e.payload) for e in await stored(persistence, sid)] == [
        (1, {"inc": "b"}), (2, {"inc": "b"})]
    assert persistence.stats.stale == 5 and persistence.stats.deleted == 0
    assert persistence.stats.applied == 2
    await persistence.handle([entry(8, "b", 3), entry(9, "b", 0, DELETED), entry(10, "a", 4)])
    assert await persistence.count(sid) == 0
    assert persistence.stats.stale == 5 + 2 and persistence.stats.deleted == 1
    assert persistence.stats.applied == 2


async def test_deliveries_carry_raw_payloads_and_rows_keep_the_feeds_json(
    event_log: EventLog, persistence: Persistence
) -> None:
    from eventcore._codec import RawPayloadEnvelope

    s = await event_log.create_session("a")
    await event_log.append(Envelope(type="message", session_id=s.session_id,
                                    payload={"text": "é\\n", "n": [1, {"x": None}]},
                                    server_data={"secret": 1}))
    seen: list[Delivery] = []
    handle = persistence.handle

    async def spy(deliveries: list[Delivery]) -> None:
        seen.extend(deliveries)
        await handle(deliveries)

    persistence.handle = spy  # type: ignore[method-assign]
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    msg = next(d for d in seen if d.envelope.type == "message")
    assert isinstance(msg.envelope, RawPayloadEnvelope)  # nothing of the payload decoded
    assert bytes(msg.envelope.payload) == b'{"text":"\xc3\xa9\\\\n","n":[1,{"x":null}]}'
    assert await stored(persistence, s.session_id) == await read_all(event_log, s.session_id)


async def test_a_batch_with_nothing_to_write_leaves_no_session_locked(
    event_log: EventLog, persistence: Persistence
) -> None:
    """Within a batch the positions are read in the write's transaction (PostgreSQL: the
    sessions' rows locked): when there is nothing to write (all duplicates), it is rolled
    back, so another writer of the session is not held up."""
    (sid, _top), = (await populate(event_log, 1, 5)).items()
    await SubscriberRunner(event_log, persistence, **fast()).drain()
    log = await read_all(event_log, sid)
    await persistence.handle([Delivery("0-1", 0, e) for e in log])  # duplicates only
    assert persistence.stats.duplicates == len(log)
    # another consumer's transaction writes the session at once (a lock left behind would
    # make it wait: NOWAIT fails instead)
    t = persistence.tables["sessions"]
    async with persistence.engine.begin() as conn:
        q = sa.select(t.c.last_seq).where(t.c.session_id == sid).with_for_update(nowait=True)
        assert (await conn.execute(q)).scalar_one() == len(log)
    await persistence.handle([Delivery("0-1", 0, e) for e in log])  # and once more
    assert await stored(persistence, sid) == log


async def test_a_write_keeps_every_row_of_the_runs_that_fit_and_none_of_the_others(
    persistence: Persistence,
) -> None:
    """One write of runs of several sizes (more rows than one statement of the write takes,
    and remainders of every size) where one run's session is stored at another incarnation:
    that run is a conflict and leaves nothing; every other run is stored whole, each
    (session, seq) once, its watermark at its last seq."""
    from eventcore.subscribers._ordered import Run

    def envs(sid: str, n: int, inc: str) -> tuple[Envelope, ...]:
        return tuple(Envelope(type="message", session_id=sid, seq=s, payload={"inc": inc})
                     for s in range(1, n + 1))

    await persistence.apply([Run("s_taken", 0, envs("s_taken", 2, "z"), "z", True)])
    sizes = {"s_big": 300, "s_one": 1, "s_odd": 127}
    runs = [Run("s_big", 0, envs("s_big", 300, "a"), "a", True),
            Run("s_taken", 2, envs("s_taken", 5, "a")[2:], "a"),
            Run("s_one", 0, envs("s_one", 1, "a"), "a", True),
            Run("s_odd", 0, envs("s_odd", 127, "a"), "a", True)]
    assert list(await persistence.apply(runs)) == ["s_taken"]
    for sid, n in sizes.items():
        assert [(e.seq, e.payload) for e in await stored(persistence, sid)] == [
            (s, {"inc": "a"}) for s in range(1, n + 1)]
    assert [(e.seq, e.payload) for e in await stored(persistence, "s_taken")] == [
        (1, {"inc": "z"}), (2, {"inc": "z"})]
    assert await persistence.watermarks([*sizes, "s_taken"]) == {**sizes, "s_taken": 2}
    again = [Run("s_big", 0, envs("s_big", 300, "a"), "a")]  # delivered twice: kept once
    assert list(await persistence.apply(again)) == []
    assert await persistence.count("s_big") == 300
