"""Persistence: every envelope into SQLite (default) or PostgreSQL, with SQLAlchemy Core async.

Tables (``prefix`` defaults to ``eventcore_``; PostgreSQL may also take a ``schema``):

``<prefix>events``       (session_id, seq) primary key; type, run_id, event_key, ts_ms, the client
                         envelope JSON (``envelope``) and ``server_data`` JSON, kept apart as in
                         Redis. Inserted with ON CONFLICT DO NOTHING: idempotent.
``<prefix>sessions``     session_id -> incarnation, last_seq: every seq up to it of that
                         incarnation is stored (the watermark retention trims Redis below).
                         Raised in the same transaction as the rows, never lowered within an
                         incarnation. A newer incarnation (the id deleted or expired, then
                         created again) replaces the older one's rows in the transaction that
                         stores its first; a deleted one leaves no rows, only this row with
                         ``deleted_ms`` (so late redeliveries of it are recognized and dropped).
``<prefix>checkpoints``  (group, shard) -> feed entry id, for NOGROUP recovery without Redis.
``<prefix>schema``       the schema version; created at start, refused when newer than ours.

It is also the :class:`~eventcore.HistoryArchive` for tiered replay: give it to the log as
``EventLog(archive=persistence)`` (or set ``log.archive``) and reads of trimmed history come
from here.
"""

from __future__ import annotations

import logging
import operator
import random
import sqlite3
import time
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypeVar

import anyio
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from eventcore import ConfigError, Envelope, EventLog, client_json, load_settings
from eventcore._codec import body_fields, decode_entry, encode
from eventcore._extras import require_extra
from eventcore.errors import UsageError

from ._delivery import Delivery
from ._ordered import OrderedSubscriber, Position, Run

__all__ = ["SCHEMA_VERSION", "Persistence", "is_unavailable"]

SCHEMA_VERSION: Final = 2  # 2: sessions.incarnation and sessions.deleted_ms
log_ = logging.getLogger("eventcore.persistence")
T = TypeVar("T")
_CHUNK = 500
# SQLite: events rows per INSERT statement (8 parameters each; SQLite allows 32766 per
# statement since 3.32, 999 before: 124 rows)
_INSERT_ROWS = 256 if sqlite3.sqlite_version_info >= (3, 32) else 64


def is_unavailable(exc: BaseException) -> bool:
    """The database is down, restarting or unreachable (as opposed to refusing the data)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (OSError, sa_exc.OperationalError, sa_exc.InterfaceError,
                        sa_exc.TimeoutError, sqlite3.OperationalError)):
        return True
    # the hot write goes to asyncpg directly: its errors arrive unwrapped
    return type(exc).__module__.startswith("asyncpg") and _asyncpg_unavailable(exc)


def _asyncpg_unavailable(exc: BaseException) -> bool:
    import asyncpg

    # 08: connection exceptions; 57: operator intervention (shutdown, cannot connect now);
    # InterfaceError: the connection is closed or broken on our side
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                            asyncpg.exceptions.OperatorInterventionError))


# Session ids compare bytewise on PostgreSQL (COLLATE "C"): the key of both tables' primary
# keys, compared in every index insert, where a linguistic collation (even C.UTF-8) costs a
# third of COPY's work per row. Equality is the same under any deterministic collation, and
# every consumer of one database orders its locks by the same column's collation. Tables
# created before keep their collation (nothing is altered).
_SESSION_ID = sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql")


def _tables(prefix: str, schema: str | None) -> tuple[sa.MetaData, dict[str, sa.Table]]:
    md = sa.MetaData(schema=schema)
    t = {
        "events": sa.Table(
            f"{prefix}events", md,
            sa.Column("session_id", _SESSION_ID, primary_key=True),
            sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("type", sa.String(128), nullable=False),
            sa.Column("run_id", sa.Text),
            sa.Column("event_key", sa.Text, nullable=False),
            sa.Column("ts_ms", sa.BigInteger, nullable=False),
            sa.Column("envelope", sa.Text, nullable=False),
            sa.Column("server_data", sa.Text),
        ),
        "sessions": sa.Table(
            f"{prefix}sessions", md,
            sa.Column("session_id", _SESSION_ID, primary_key=True),
            sa.Column("last_seq", sa.BigInteger, nullable=False),
            sa.Column("updated_ms", sa.BigInteger, nullable=False),
            sa.Column("incarnation", sa.String(32), nullable=False, server_default=""),
            sa.Column("deleted_ms", sa.BigInteger),
        ),
        "checkpoints": sa.Table(
            f"{prefix}checkpoints", md,
            sa.Column("group_name", sa.String(200), primary_key=True),
            sa.Column("shard", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("entry_id", sa.String(64), nullable=False),
        ),
        "schema": sa.Table(
            f"{prefix}schema", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("version", sa.Integer, nullable=False),
        ),
    }
    return md, t


def _chunks(items: Sequence[T], n: int = _CHUNK) -> list[Sequence[T]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


class Persistence(OrderedSubscriber):
    """Stores every envelope, in order and exactly once per (session_id, seq).

    ``url``: a SQLAlchemy async URL (``postgresql+asyncpg://...``, ``sqlite+aiosqlite:///...``);
    default ``EVENTCORE_DATABASE_URL``, else SQLite at ``<data_dir>/history.sqlite3``. While
    the database is unreachable, writes back off (up to ``backoff_s[1]`` between tries) and
    retry for as long as it takes, holding their entries pending; nothing is dead-lettered
    for an outage. Archive reads give up after ``read_budget_s``.
    """

    name = "persistence"
    #: the rows keep each envelope's JSON as the feed delivered it: no payload is decoded
    raw_payloads = True
    #: a connection kept between batches is given back after this long without one (then the
    #: next batch checks out a pinged one: a connection idle that long may have been dropped)
    hold_idle_s = 5.0

    def __init__(
        self,
        log: EventLog | None = None,
        url: str | None = None,
        *,
        prefix: str = "eventcore_",
        schema: str | None = None,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        read_budget_s: float = 10.0,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(log)  # without a log: a read-only archive
        settings = log.settings if log is not None else load_settings()
        if url is None:
            url = settings.database_url
        if url is None:
            path = Path(settings.data_dir) / "history.sqlite3"
            url = f"sqlite+aiosqlite:///{path}"
        self.url = url
        self.prefix = prefix
        self.schema = schema
        self.backoff_s = backoff_s
        self.read_budget_s = read_budget_s
        self.engine_options = dict(engine_options or {})
        self.metadata, self.tables = _tables(prefix, schema)
        self.db_retries = 0
        self._engine: AsyncEngine | None = None
        self._sql: _Sql | None = None
        # the deliveries of the batch in hand, by their envelope's identity: a run's envelope
        # that came from the feed is stored as the feed's JSON (not encoded again)
        self._from_feed: dict[int, Delivery] = {}
        # the pooled connection batches read their positions and write on, kept from one batch
        # to the next while they keep coming (no checkout, so no pre-ping's round trips, per
        # batch); given back once idle for ``hold_idle_s`` (the next batch checks out a fresh,
        # pinged one), after a failure on it, and at close. Only the task handling a batch
        # uses it, and only during the batch: a call from another task meanwhile (watermarks
        # read by an API, a test) checks out its own, so it neither shares nor replaces it
        self._batch_task: int | None = None
        self._held: AsyncConnection | None = None
        self._held_at = 0.0  # when the last batch on it ended (monotonic)
        # PostgreSQL: the transaction a batch's positions were read in (its sessions' rows
        # locked), which the batch's write then continues: positions and write in one
        # transaction, no round trip of their own. Rolled back if the batch writes nothing
        self._open: _Open | None = None
        self._dialect = sa.engine.make_url(url).get_backend_name()
        if self._dialect not in ("sqlite", "postgresql"):
            raise ConfigError(f"database URL {url!r}: use postgresql+asyncpg:// or sqlite+aiosqlite://")

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise UsageError("Persistence is not started: use `async with Persistence(...)`")
        return self._engine

    async def start(self) -> None:
        """Connect, create the tables if missing and check the schema version (retrying while
        the database is unreachable, up to ``read_budget_s``)."""
        opts: dict[str, Any] = {"pool_pre_ping": True, **self.engine_options}
        if self._dialect == "sqlite":
            path = sa.engine.make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            opts.setdefault("connect_args", {"timeout": 10, "command_timeout": 60})
        require_extra("sql" if self._dialect == "sqlite" else "postgres",
                      f"Persistence to {self._dialect}")
        self._engine = create_async_engine(self.url, **opts)
        self._sql = _Sql(self._engine.dialect, self.tables)
        if self._dialect == "sqlite":
            sa.event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            await self._retrying(self._create_schema, budget_s=self.read_budget_s)
        except BaseException:
            await self.aclose()
            raise

    async def _create_schema(self) -> None:
        async with self.engine.begin() as conn:
            if self._dialect == "postgresql":  # concurrent starts: one creates, others wait
                lock = zlib.crc32(f"{self.schema}.{self.prefix}".encode())
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
            await conn.run_sync(self.metadata.create_all)
            t = self.tables["schema"]
            found = (await conn.execute(sa.select(t.c.version).where(t.c.id == 1))).scalar()
            if found is None:
                await conn.execute(t.insert().values(id=1, version=SCHEMA_VERSION))
            elif found > SCHEMA_VERSION:
                raise ConfigError(
                    f"the history database ({self.prefix}schema) is at schema version {found}; "
                    f"this eventcore knows up to {SCHEMA_VERSION}: upgrade eventcore"
                )
            elif found < 2:
                sessions = conn.dialect.identifier_preparer.format_table(self.tables["sessions"])
                for column in ("incarnation VARCHAR(32) NOT NULL DEFAULT ''",
                               "deleted_ms BIGINT"):
                    await conn.execute(sa.text(f"ALTER TABLE {sessions} ADD COLUMN {column}"))
                await conn.execute(t.update().values(version=SCHEMA_VERSION))

    async def aclose(self) -> None:
        await self._release_held()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            with anyio.CancelScope(shield=True):  # closing must finish even when cancelled
                await engine.dispose()

    async def drop_tables(self) -> None:
        """Drop the tables (tests and teardown)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.drop_all)

    # -- retrying ------------------------------------------------------------------------------
    async def _retrying(
        self, fn: Callable[[], Awaitable[T]], *, budget_s: float | None = None
    ) -> T:
        deadline = None if budget_s is None else time.monotonic() + budget_s
        attempt = 0
        while True:
            try:
                return await fn()
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                attempt += 1
                self.db_retries += 1
                base, cap = self.backoff_s
                delay = random.uniform(0.5, 1.0) * min(cap, base * 2 ** min(attempt - 1, 20))
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                log_.warning("persistence: database unavailable (%s); retry %d in %.2fs",
                             type(exc).__name__, attempt, delay)
                await anyio.sleep(delay)

    def _insert(self, table: sa.Table) -> Any:
        if self._dialect == "postgresql":
            from sqlalchemy.dialects import postgresql

            return postgresql.insert(table)
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table)

    # -- the subscriber ------------------------------------------------------------------------
    # The hot path (positions, the write of a batch) talks to the driver on SQLAlchemy's pooled
    # connection, in one statement per step for the whole batch: SQLAlchemy's per-row parameter
    # processing and statement compilation cost more than the database's work.
    @property
    def sql(self) -> _Sql:
        if self._sql is None:
            raise UsageError("Persistence is not started: use `async with Persistence(...)`")
        return self._sql

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        # (every delivery: one without the feed's JSON is told apart in _record)
        self._from_feed = dict(zip(map(id, map(_ENVELOPE, deliveries)), deliveries,
                                   strict=True))
        self._batch_task = anyio.get_current_task().id
        if self._held is not None and time.monotonic() - self._held_at > self.hold_idle_s:
            await self._release_held()
        try:
            await super().handle(deliveries)
        finally:
            await self._close_open()
            self._from_feed, self._batch_task = {}, None
            self._held_at = time.monotonic()

    async def _close_open(self) -> None:
        """Roll back the transaction the batch's positions were read in, if still open."""
        opened, self._open = self._open, None
        if opened is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await opened.tx.rollback()
                except Exception as exc:  # the connection is broken: nothing is held on it
                    log_.debug("persistence: rolling back the positions' transaction: %r",
                               exc)

    async def _release_held(self) -> None:
        """Give the connection kept between batches back to the pool."""
        held, self._held = self._held, None
        if held is not None:
            with anyio.CancelScope(shield=True):
                await held.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection]:
        """The hot path's connection: within a batch the one kept between batches (checked
        out, and pre-pinged by the pool, when there is none), else a checkout of its own. A
        failure gives it up (discarded when the database is unavailable), so a retry checks
        out a fresh, pinged one."""
        if self._batch_task is None or anyio.get_current_task().id != self._batch_task:
            async with self.engine.connect() as conn:
                yield conn
            return
        if self._held is None:
            self._held = await self.engine.connect()
        try:
            yield self._held
        except BaseException as exc:
            held, self._held = self._held, None
            if held is not None:
                with anyio.CancelScope(shield=True):
                    if is_unavailable(exc):
                        await held.invalidate()
                    await held.close()
            raise

    async def positions(self, session_ids: Collection[str]) -> Mapping[str, Position]:
        return await self._retrying(lambda: self._positions(list(session_ids)))

    async def _positions(self, session_ids: Sequence[str]) -> dict[str, Position]:
        sql = self.sql
        await self._close_open()  # a conflict's round: read again, in a new transaction
        async with self._connection() as conn:
            driver = await _driver(conn)
            if sql.postgres and conn is self._held:  # within a batch: see _open
                tx = driver.transaction()
                await tx.start()
                try:
                    stored = await self._lock_pg(driver, sorted(session_ids),
                                                 int(time.time() * 1000))
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await tx.rollback()
                    raise
                self._open = _Open(conn, tx, stored)
                return {sid: Position(last, inc, deleted is not None)
                        for sid, (inc, deleted, last) in stored.items()}
            if sql.postgres:
                rows = await driver.fetch(sql.positions, session_ids)
            else:  # every chunk in one call on the connection's thread
                rows = await _in_sqlite_thread(driver, _positions_sqlite, sql, session_ids)
        return {sid: Position(int(seq), inc, deleted is not None)
                for sid, seq, inc, deleted in rows}

    async def apply(self, runs: Sequence[Run]) -> Collection[str]:
        return await self._retrying(lambda: self._write(runs))

    async def _write(self, runs: Sequence[Run]) -> list[str]:
        now = int(time.time() * 1000)
        from_feed = self._from_feed
        sids = sorted({r.session_id for r in runs})
        async with self._connection() as conn:
            driver = await _driver(conn)
            if self.sql.postgres:
                opened, self._open = self._open, None
                try:
                    if (opened is not None and opened.conn is conn
                            and opened.stored.keys() >= set(sids)):
                        # the transaction the positions were read in, its rows locked
                        try:
                            conflicts = await self._write_pg(driver, runs, sids, now, from_feed,
                                                             stored=opened.stored)
                        except BaseException:
                            with anyio.CancelScope(shield=True):
                                await opened.tx.rollback()
                            raise
                        await opened.tx.commit()
                        return conflicts
                    if opened is not None:
                        self._open = opened
                        await self._close_open()
                    async with driver.transaction():
                        return await self._write_pg(driver, runs, sids, now, from_feed)
                except Exception as exc:
                    if not _unique_violation(exc):
                        raise
                log_.info("persistence: rows past a watermark are stored already; writing "
                          "the batch again through the conflict check")
                async with driver.transaction():
                    return await self._write_pg(driver, runs, sids, now, from_feed,
                                                staged=True)
            return await self._write_sqlite(driver, runs, sids, now, from_feed)

    @staticmethod
    def _fitting(runs: Sequence[Run], stored: Mapping[str, tuple[str, int | None, int]]
                 ) -> tuple[list[Run], list[str]]:
        ok: list[Run] = []
        conflicts: list[str] = []
        for run in runs:
            inc, deleted_ms, _ = stored[run.session_id]
            # a reset replaces an older incarnation; anything else continues the stored one
            fits = inc < run.incarnation if run.reset else (
                inc == run.incarnation and deleted_ms is None)
            if fits:
                ok.append(run)
            else:
                conflicts.append(run.session_id)
        return ok, conflicts

    async def _lock_pg(self, driver: Any, sids: list[str], now: int
                       ) -> dict[str, tuple[str, int | None, int]]:
        """The sessions' rows (incarnation, deleted_ms, last_seq), locked until the transaction
        ends; created empty first where missing, so that there is a row to lock. ``sids``
        sorted: locked in one order everywhere, so no deadlock between two consumers."""
        sql = self.sql
        stored: dict[str, tuple[str, int | None, int]] = {
            sid: (inc, deleted, last) for sid, inc, deleted, last
            in await driver.fetch(sql.lock, sids)}
        missing = [sid for sid in sids if sid not in stored]
        if missing:
            await driver.execute(sql.ensure, missing, now)
            stored.update({sid: (inc, deleted, last) for sid, inc, deleted, last
                           in await driver.fetch(sql.lock, missing)})
        return stored

    async def _write_pg(self, driver: Any, runs: Sequence[Run], sids: list[str], now: int,
                        from_feed: Mapping[int, Delivery], *, staged: bool = False,
                        stored: Mapping[str, tuple[str, int | None, int]] | None = None,
                        ) -> list[str]:
        """One transaction: the sessions' rows locked (created empty first where missing, so
        that there is a row to lock; in one order everywhere: no deadlock between two
        consumers), an older incarnation's rows deleted where a run resets, the envelopes
        inserted (idempotent on (session_id, seq)) and the watermarks raised, each one
        statement for the whole batch with array parameters.

        The rows go in by COPY, straight into the events table: a session's rows and its
        watermark commit together and the watermark never falls within an incarnation, so
        under the lock no row past the watermark exists (a reset purges them all first),
        and only the rows past it are sent. Should one be there anyway (written by hand, or
        by an older version), COPY fails on the primary key and the caller writes the batch
        again ``staged``: COPY into a temporary table, then INSERT ... SELECT ON CONFLICT DO
        NOTHING (an extra pass over every row in the server).

        ``stored``: the rows locked already in this transaction (the batch's positions were
        read in it), else locked here."""
        sql = self.sql
        if stored is None:
            stored = await self._lock_pg(driver, sids, now)
        ok, conflicts = self._fitting(runs, stored)
        if not ok:
            return conflicts
        resets = [r.session_id for r in ok if r.reset]
        if resets:
            await driver.execute(sql.purge, resets)
        if staged:
            rows = _rows([run.envelopes for run in ok], from_feed)
        else:  # only what is past the watermark (a run may start below it: duplicates)
            rows = _rows([_past(run, 0 if run.reset else stored[run.session_id][2])
                          for run in ok], from_feed)
        if rows and staged:
            # COPY's binary records cost a fraction of the CPU of array parameters (asyncpg
            # checks every array element's type through the ABCs) or of SQLAlchemy's
            # executemany. The staging table keeps its rows only until the transaction ends
            # (a rollback leaves nothing behind); it is created in every transaction, not
            # once per connection: behind a transaction-mode pooler the next transaction may
            # run on another server connection.
            await driver.execute(sql.stage)
            await driver.copy_records_to_table(sql.stage_name, records=rows, columns=_COLUMNS,
                                               schema_name="pg_temp")
            await driver.execute(sql.insert)
        elif rows:
            await driver.copy_records_to_table(sql.events_name, records=rows,
                                               columns=_COLUMNS, schema_name=self.schema)
        await driver.execute(sql.marks, [r.session_id for r in ok], [r.last for r in ok],
                             [r.incarnation for r in ok], [r.reset for r in ok], now)
        return conflicts

    async def _write_sqlite(self, driver: Any, runs: Sequence[Run], sids: list[str], now: int,
                            from_feed: Mapping[int, Delivery]) -> list[str]:
        """The same steps in one SQLite transaction, begun IMMEDIATE (the write lock taken
        before the sessions rows are read, as FOR UPDATE does on PostgreSQL), all in one call
        on the connection's thread (see ``_write_sqlite_sync``). The rows are made here, on
        the loop, before: every run could fit."""
        rows = _rows([run.envelopes for run in runs], from_feed)
        return await _in_sqlite_thread(driver, _write_sqlite_sync, self.sql, runs, sids, now,
                                       rows)

    async def deleted(self, session_id: str, incarnation: str) -> None:
        """Purge the deleted incarnation's rows (and an older one's), leaving the sessions row
        as a tombstone, unless a newer incarnation is stored already."""
        await self._retrying(lambda: self._purge(session_id, incarnation))

    async def _purge(self, session_id: str, incarnation: str) -> None:
        events, sessions = self.tables["events"], self.tables["sessions"]
        now = int(time.time() * 1000)
        async with self.engine.begin() as conn:
            inc, _ = (await self._lock(conn, session_id, now))
            if inc > incarnation:
                return
            await conn.execute(events.delete().where(events.c.session_id == session_id))
            await conn.execute(sessions.update().where(sessions.c.session_id == session_id)
                               .values(incarnation=incarnation, last_seq=0, deleted_ms=now,
                                       updated_ms=now))

    async def _lock(self, conn: AsyncConnection, session_id: str, now: int
                    ) -> tuple[str, int | None]:
        """The session's row (incarnation, deleted_ms), locked until the transaction ends;
        inserted empty first if missing, so that there is a row to lock."""
        t = self.tables["sessions"]
        await conn.execute(
            self._insert(t).on_conflict_do_nothing(index_elements=["session_id"]),
            {"session_id": session_id, "last_seq": 0, "updated_ms": now, "incarnation": ""})
        inc, deleted = (await conn.execute(
            sa.select(t.c.incarnation, t.c.deleted_ms).where(t.c.session_id == session_id)
            .with_for_update())).one()
        return inc, deleted

    # -- the archive (tiered replay) -----------------------------------------------------------
    async def read(self, session_id: str, after: int, limit: int) -> Sequence[Envelope]:
        """Stored envelopes of a session with seq > ``after``, in order (HistoryArchive)."""
        t = self.tables["events"]
        query = (
            sa.select(t.c.envelope, t.c.server_data)
            .where(t.c.session_id == session_id, t.c.seq > after)
            .order_by(t.c.seq)
            .limit(limit)
        )

        async def go() -> list[Envelope]:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
            return [_envelope(session_id, d, sd) for d, sd in rows]

        return await self._retrying(go, budget_s=self.read_budget_s)

    async def watermarks(self, session_ids: Collection[str]) -> Mapping[str, int]:
        """Per session, the seq up to which everything (of its stored incarnation) is stored."""
        return {sid: pos.seq for sid, pos in (await self.positions(session_ids)).items()}

    async def stored_before(
        self, session_ids: Collection[str], cutoff_ms: int
    ) -> Mapping[str, tuple[int, str]]:
        """Per session, the highest stored seq at or below its watermark whose envelope was
        published before ``cutoff_ms`` (epoch ms), and the incarnation it belongs to: what a
        hot window of that incarnation's history may drop."""
        e, s = self.tables["events"], self.tables["sessions"]

        async def go() -> dict[str, tuple[int, str]]:
            out: dict[str, tuple[int, str]] = {}
            async with self.engine.connect() as conn:
                for chunk in _chunks(list(session_ids)):
                    rows = await conn.execute(
                        sa.select(e.c.session_id, sa.func.max(e.c.seq), s.c.incarnation)
                        .join(s, s.c.session_id == e.c.session_id)
                        .where(e.c.session_id.in_(chunk), e.c.ts_ms < cutoff_ms,
                               e.c.seq <= s.c.last_seq)
                        .group_by(e.c.session_id, s.c.incarnation)
                    )
                    out.update({sid: (int(seq), inc) for sid, seq, inc in rows
                                if seq is not None})
            return out

        return await self._retrying(go, budget_s=self.read_budget_s)

    async def count(self, session_id: str | None = None) -> int:
        """How many envelopes are stored (for one session, or all)."""
        t = self.tables["events"]
        q = sa.select(sa.func.count()).select_from(t)
        if session_id is not None:
            q = q.where(t.c.session_id == session_id)
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    # -- checkpoints (CheckpointStore) ---------------------------------------------------------
    async def load_checkpoint(self, group: str, shard: int) -> str | None:
        t = self.tables["checkpoints"]

        async def go() -> str | None:
            async with self.engine.connect() as conn:
                return (await conn.execute(
                    sa.select(t.c.entry_id).where(t.c.group_name == group, t.c.shard == shard)
                )).scalar()

        return await self._retrying(go, budget_s=self.read_budget_s)

    async def save_checkpoint(self, group: str, shard: int, entry_id: str) -> None:
        t = self.tables["checkpoints"]
        stmt = self._insert(t).values(group_name=group, shard=shard, entry_id=entry_id)
        stmt = stmt.on_conflict_do_update(
            index_elements=["group_name", "shard"], set_={"entry_id": stmt.excluded.entry_id}
        )

        async def go() -> None:
            async with self.engine.begin() as conn:
                await conn.execute(stmt)

        await self._retrying(go, budget_s=self.read_budget_s)


class _Open(NamedTuple):
    """A transaction a batch's positions were read in (PostgreSQL), on the batch's held
    connection: its sessions' rows, as locked."""

    conn: AsyncConnection
    tx: Any
    stored: dict[str, tuple[str, int | None, int]]


_ENVELOPE: Final = operator.attrgetter("envelope")
_COLUMNS: Final = ("session_id", "seq", "type", "run_id", "event_key", "ts_ms", "envelope",
                   "server_data")


def _record(env: Envelope, d: Delivery | None) -> tuple[Any, ...]:
    """One events row, in ``_COLUMNS`` order: the JSON the feed delivered the envelope in (an
    envelope filled from the log, or hydrated, is encoded)."""
    if d is not None and d.body:
        sd = d.server_body
        return (env.session_id, env.seq, env.type, env.run_id, env.event_key,
                int(env.ts.timestamp() * 1000), d.body.decode(),
                None if sd is None else sd.decode())
    return (env.session_id, env.seq, env.type, env.run_id, env.event_key,
            int(env.ts.timestamp() * 1000), client_json(env).decode(),
            None if env.server_data is None else encode(env.server_data).decode())


def _rows(runs: Iterable[Sequence[Envelope]], from_feed: Mapping[int, Delivery]
          ) -> list[tuple[Any, ...]]:
    """The events rows of these runs' envelopes, as ``_record`` makes them (the hot path:
    the common case, an envelope with the feed's JSON, inline)."""
    out: list[tuple[Any, ...]] = []
    append = out.append
    get = from_feed.get
    for envelopes in runs:
        for env in envelopes:
            d = get(id(env))
            if d is None or not d.body:
                append(_record(env, d))
                continue
            sd = d.server_body
            append((env.session_id, env.seq, env.type, env.run_id, env.event_key,
                    int(env.ts.timestamp() * 1000), d.body.decode(),
                    None if sd is None else sd.decode()))
    return out


async def _in_sqlite_thread(driver: Any, fn: Callable[..., T], *args: Any) -> T:
    """``fn(connection, *args)`` on the aiosqlite connection's own thread, on its sqlite3
    connection: one hand-over to that thread (and back) for all the statements in ``fn``,
    rather than one per statement. (aiosqlite has no public call for this: its ``_execute``
    queues a function for the thread, and ``_conn`` is the sqlite3 connection there.)"""
    result: T = await driver._execute(fn, driver._conn, *args)
    return result


def _positions_sqlite(conn: sqlite3.Connection, sql: _Sql, session_ids: Sequence[str]
                      ) -> list[tuple[str, int, str, int | None]]:
    rows: list[tuple[str, int, str, int | None]] = []
    for chunk in _chunks(session_ids):
        rows += conn.execute(sql.positions_in(len(chunk)), chunk).fetchall()
    return rows


def _write_sqlite_sync(conn: sqlite3.Connection, sql: _Sql, runs: Sequence[Run],
                       sids: list[str], now: int, rows: list[tuple[Any, ...]]) -> list[str]:
    """A batch's write on the SQLite connection's thread, in one transaction begun IMMEDIATE:
    the sessions' rows read (created empty where missing), an older incarnation's rows deleted
    where a run resets, the rows inserted (idempotent on (session_id, seq)), the watermarks
    raised, committed; rolled back on any failure. ``rows``: the runs' envelopes' rows, run
    after run (the rows of a run that does not fit are left out).

    The rows go in by multi-row INSERTs (``_Sql.insert_rows``), not executemany: the sqlite3
    module binds all of a statement's parameters, then steps it once without the GIL, where
    executemany takes the GIL back for every row (against the event loop's thread)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        stored: dict[str, tuple[str, int | None, int]] = {}
        for chunk in _chunks(sids):
            stored.update({sid: (inc, deleted, last) for sid, inc, deleted, last
                           in conn.execute(sql.lock_in(len(chunk)), chunk)})
        missing = [sid for sid in sids if sid not in stored]
        if missing:
            conn.executemany(sql.ensure, [(sid, now) for sid in missing])
            stored.update(dict.fromkeys(missing, ("", None, 0)))
        ok, conflicts = Persistence._fitting(runs, stored)
        if conflicts:
            kept: list[tuple[Any, ...]] = []
            at = 0
            fits = set(map(id, ok))
            for run in runs:
                n = len(run.envelopes)
                if id(run) in fits:
                    kept += rows[at : at + n]
                at += n
            rows = kept
        resets = [r.session_id for r in ok if r.reset]
        for chunk in _chunks(resets):
            conn.execute(sql.purge_in(len(chunk)), chunk)
        at, total = 0, len(rows)
        while at < total:
            # full statements of _INSERT_ROWS rows, then the rest in powers of two: a few
            # statements' texts, each prepared once (the connection's statement cache)
            n = _INSERT_ROWS if total - at >= _INSERT_ROWS else 1 << ((total - at).bit_length() - 1)
            conn.execute(sql.insert_rows(n), [v for row in rows[at : at + n] for v in row])
            at += n
        raised = [(r.last, now, r.session_id) for r in ok if not r.reset]
        if raised:
            conn.executemany(sql.raise_mark, raised)
        restarted = [(r.last, r.incarnation, now, r.session_id) for r in ok if r.reset]
        if restarted:
            conn.executemany(sql.restart_mark, restarted)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return conflicts


def _past(run: Run, watermark: int) -> Sequence[Envelope]:
    """The run's envelopes with seq past ``watermark`` (a run is contiguous from after + 1)."""
    skip = watermark - run.after
    return run.envelopes[skip:] if skip > 0 else run.envelopes


def _unique_violation(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("asyncpg") and getattr(exc, "sqlstate", "") == "23505"


async def _driver(conn: AsyncConnection) -> Any:
    """The driver's own connection under SQLAlchemy's pooled one (asyncpg or aiosqlite)."""
    return (await conn.get_raw_connection()).driver_connection


class _Sql:
    """The hot path's statements, for one dialect and set of tables."""

    def __init__(self, dialect: sa.engine.Dialect, tables: Mapping[str, sa.Table]) -> None:
        quote = dialect.identifier_preparer
        self.postgres = dialect.name == "postgresql"
        events = quote.format_table(tables["events"])
        self.sessions = sessions = quote.format_table(tables["sessions"])
        self.events = events
        cols = ", ".join(_COLUMNS)
        if self.postgres:
            self.positions = (f"SELECT session_id, last_seq, incarnation, deleted_ms "
                              f"FROM {sessions} WHERE session_id = ANY($1::text[])")
            self.lock = (f"SELECT session_id, incarnation, deleted_ms, last_seq FROM {sessions} "
                         f"WHERE session_id = ANY($1::text[]) ORDER BY session_id FOR UPDATE")
            self.ensure = (f"INSERT INTO {sessions} (session_id, last_seq, updated_ms, "
                           f"incarnation) SELECT sid, 0, $2::bigint, '' "
                           f"FROM unnest($1::text[]) AS sid "
                           f"ORDER BY sid ON CONFLICT (session_id) DO NOTHING")
            self.purge = f"DELETE FROM {events} WHERE session_id = ANY($1::text[])"
            self.events_name = tables["events"].name
            self.stage_name = f"{tables['events'].name}_stage"
            stage = quote.quote(self.stage_name)
            self.stage = (f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
                          f"(LIKE {events} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            self.insert = (f"INSERT INTO {events} ({cols}) SELECT {cols} FROM {stage} "
                           f"ON CONFLICT (session_id, seq) DO NOTHING")
            # within an incarnation the watermark only rises; a reset starts the new one
            self.marks = (
                f"UPDATE {sessions} AS s SET "
                f"last_seq = CASE WHEN u.reset THEN u.last "
                f"ELSE GREATEST(s.last_seq, u.last) END, "
                f"incarnation = CASE WHEN u.reset THEN u.inc ELSE s.incarnation END, "
                f"deleted_ms = CASE WHEN u.reset THEN NULL ELSE s.deleted_ms END, "
                f"updated_ms = $5 "
                f"FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bool[]) "
                f"AS u(sid, last, inc, reset) WHERE s.session_id = u.sid")
        else:
            self.ensure = (f"INSERT OR IGNORE INTO {sessions} (session_id, last_seq, "
                           f"updated_ms, incarnation) VALUES (?, 0, ?, '')")
            self._insert_head = f"INSERT OR IGNORE INTO {events} ({cols}) VALUES "
            self._insert_rows: dict[int, str] = {}
            self.raise_mark = (f"UPDATE {sessions} SET last_seq = MAX(last_seq, ?), "
                               f"updated_ms = ? WHERE session_id = ?")
            self.restart_mark = (f"UPDATE {sessions} SET last_seq = ?, incarnation = ?, "
                                 f"deleted_ms = NULL, updated_ms = ? WHERE session_id = ?")

    def insert_rows(self, n: int) -> str:
        """SQLite: one INSERT of ``n`` events rows (``n * len(_COLUMNS)`` parameters)."""
        text = self._insert_rows.get(n)
        if text is None:
            row = f"({', '.join('?' * len(_COLUMNS))})"
            text = self._insert_rows[n] = self._insert_head + ", ".join([row] * n)
        return text

    def positions_in(self, n: int) -> str:
        return (f"SELECT session_id, last_seq, incarnation, deleted_ms FROM {self.sessions} "
                f"WHERE session_id IN ({', '.join('?' * n)})")

    def lock_in(self, n: int) -> str:
        return (f"SELECT session_id, incarnation, deleted_ms, last_seq FROM {self.sessions} "
                f"WHERE session_id IN ({', '.join('?' * n)})")

    def purge_in(self, n: int) -> str:
        return f"DELETE FROM {self.events} WHERE session_id IN ({', '.join('?' * n)})"


def _envelope(session_id: str, d: str, sd: str | None) -> Envelope:
    fields = body_fields(d.encode(), None if sd is None else sd.encode())
    return decode_entry(fields, where=f"archive {session_id!r}")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets archive reads run while the subscriber writes; NORMAL is durable at checkpoints.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
