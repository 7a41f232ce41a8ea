"""The SSE hub: one per API process, copying each watched session's events to all its clients.

Not a consumer group (a group would split events between clients instead of copying them).

- **Catch-up** is a client's own XRANGE pages from its cursor (``EventLog.read`` when a page
  needs the archive), so a client resuming from seq 0 never slows anyone else. A page is
  bounded in entries (``page``) and in bytes (``buffer_bytes`` past its first event; a
  blob-backed event is a page of its own, hydrated): what a client holds never grows with the
  history. XRANGE bounds only a count, so each read asks for as many entries as the largest
  entry of the session's last read says fit, and the page is cut at the budget before
  anything awaits (a Lua script that stops at the budget cost twice Redis' CPU per page).
- **Live** is one path for the whole process: either one multiplexed XREAD over all watched
  streams (the default), or the pub/sub notifications the append script publishes
  (``"<sid> <last_seq>"`` on each shard's ``notify`` channel), after which the hub XRANGEs every
  dirty session once in one pipelined round trip. ``benchmarks/sse.py`` measures both: equal up
  to 1,000 clients, XREAD ahead beyond (pub/sub pays a second round trip per event, and
  redis-py's pub/sub parsing). A session watched while the XREAD blocks joins on the next call
  (at most ``xread_block_ms``); its clients catch up by themselves meanwhile.
- **The seam is exact** because everything is a seq cursor: a client takes an event only if it
  is exactly ``cursor + 1``. Anything at or below the cursor is a duplicate and dropped;
  anything above ``cursor + 1`` is a gap (a missed notification, a trimmed page, a buffer
  overflow) and sends the client back to catch-up reads from its cursor.
- **Missed notifications** (pub/sub is at most once) are recovered by re-reading every watched
  session after the notification connection (re)subscribes, and by a periodic sweep comparing
  each watched session's ``seq`` with the hub's cursor.
- **Incarnations**: a subscription follows one incarnation of its session (a session id deleted
  and created again is another session, whose seqs restart at 1) and ends with
  :class:`SessionNotFound` once it is gone, never crossing into the next. Entries carry their
  incarnation (``inc``), so the live path checks each fetched entry against the watch's at no
  cost in round trips: a foreign one retires the watch and ends its clients. Catch-up pages
  read the session's metadata in the same pipeline, after the page; the sweep compares the
  incarnation too, which ends followers whose session came back shorter than their cursor
  (nothing of it reaches the live path) within ``resync_s``.
- **Slow clients**: each client has a bounded buffer (``buffer`` events and ``buffer_bytes``;
  an empty buffer takes one fan-out batch whatever its size, as those events are shared).
  Fan-out never waits: a client whose buffer is full is marked lagged, its buffer dropped, and
  it continues with catch-up reads at its own pace. A client that accepts no bytes at all is
  closed by the transport's send timeout.

The hub is transport-neutral: SSE and the WebRTC data channel both iterate
:meth:`Subscription.batches` and format :class:`HubEvent` themselves.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import msgspec
import redis.exceptions as rexc
from anyio.abc import TaskGroup, TaskStatus

from eventcore import Envelope, EventLog, HistoryGone, SessionNotFound, client_json
from eventcore._codec import decode_entry, entry_client_json, entry_has_blob, entry_incarnation
from eventcore._redis import redis_errors
from eventcore._sessions import INCARNATION_FIELDS, current_incarnation
from eventcore.errors import EventcoreError, HubClosed, ValidationError

__all__ = ["Hub", "HubClosed", "HubEvent", "HubStats", "StreamReset", "Subscription"]

log_ = logging.getLogger("eventcore.hub")

_FIRST_READ = 64  # entries a session's first catch-up read asks for, before sizes are known
_FIT_SESSIONS = 10_000

LiveMode = Literal["pubsub", "xread"]


class _Ts(msgspec.Struct):
    ts: _dt.datetime


_ts_decoder = msgspec.json.Decoder(_Ts)
_envelope_decoder = msgspec.json.Decoder(Envelope)


class HubEvent:
    """One envelope as clients see it: seq, type, and the client JSON (no ``server_data``).

    Shared by every client of the session, so transports cache their framing on it (``sse``).
    ``inc`` is the incarnation its entry names (``""``: the entry does not say).
    """

    __slots__ = ("data", "inc", "seq", "sse", "type")

    def __init__(self, seq: int, type: str, data: bytes, inc: str = "") -> None:
        self.seq = seq
        self.type = type
        self.data = data
        self.inc = inc
        self.sse: bytes | None = None

    def ts(self) -> _dt.datetime:
        return _ts_decoder.decode(self.data).ts

    def __repr__(self) -> str:
        return f"HubEvent(seq={self.seq}, type={self.type!r})"


@dataclass(frozen=True, slots=True)
class StreamReset:
    """History after ``after`` is gone everywhere; the stream continues after ``resume_after``."""

    session_id: str
    after: int
    first_available: int

    @property
    def resume_after(self) -> int:
        return self.first_available - 1


@dataclass(slots=True)
class HubStats:
    """Counters for metrics (the hub itself does not depend on a metrics library)."""

    notifications: int = 0
    fetches: int = 0
    fetched_events: int = 0
    lagged_clients: int = 0
    resyncs: int = 0
    missed: int = 0


class _Client:
    __slots__ = ("buf", "closed", "gone", "inc", "lagged", "limit", "limit_bytes", "size",
                 "waiter")

    def __init__(self, limit: int, limit_bytes: int, inc: str) -> None:
        self.inc = inc  # the incarnation it follows
        self.buf: collections.deque[HubEvent] = collections.deque()
        self.size = 0  # bytes of client JSON in buf
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.lagged = False
        self.gone = False
        self.closed = False
        self.waiter: anyio.Event | None = None

    def push(self, events: Sequence[HubEvent], size: int) -> bool:
        """Queue without ever waiting; False if the client overflowed (it then catches up)."""
        if self.lagged:
            return True
        if self.buf and (len(self.buf) + len(events) > self.limit
                         or self.size + size > self.limit_bytes):
            self.clear()
            self.lagged = True
            self.wake()
            return False
        self.buf.extend(events)
        self.size += size
        self.wake()
        return True

    def clear(self) -> None:
        self.buf.clear()
        self.size = 0

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None


@dataclass(slots=True, eq=False)
class _Watch:
    """The live path's view of one incarnation of a session: every client in ``clients``
    follows ``inc`` once it is known (set with the cursor)."""

    session_id: str
    stream: str
    meta: str
    clients: set[_Client] = field(default_factory=set)
    cursor: int | None = None  # last seq the live path fetched; None until initialised
    inc: str | None = None  # the incarnation the cursor belongs to; None until initialised
    head: int = 0  # highest seq announced by a notification
    retired: bool = False  # its incarnation is gone: no longer registered, nothing fanned out


class Subscription:
    """One client's view of one incarnation of a session: iterate :meth:`batches`."""

    def __init__(
        self, hub: Hub, watch: _Watch, client: _Client, after: int,
        types: Collection[str] | None, until_ended: bool,
    ) -> None:
        self._hub = hub
        self._watch = watch
        self._client = client
        self.session_id = watch.session_id
        self.incarnation = client.inc
        self.cursor = after
        self.types = frozenset(types) if types else None
        self.until_ended = until_ended

    def _match(self, ev: HubEvent) -> bool:
        return self.types is None or ev.type in self.types

    async def batches(self) -> AsyncIterator[list[HubEvent] | StreamReset]:
        """Lists of events in seq order (each non-empty, filtered by ``types``), or a
        :class:`StreamReset` where history is gone. Ends after ``session.ended`` (with
        ``until_ended``); raises :class:`SessionNotFound` once its incarnation is gone (the
        session deleted or expired, its id perhaps created again: nothing of that one is ever
        yielded) and :class:`HubClosed` when the hub shuts down. ``self.cursor`` is the last
        seq covered."""
        hub, client = self._hub, self._client
        if self._watch.cursor is None:
            # The live path fans out only after the watch's cursor. Setting it before this
            # client's first catch-up read makes that read cover everything up to it; left to
            # the fetch loop, an append landing between this client's catch-up and the cursor's
            # initialisation reached neither path.
            with redis_errors("hub init"):
                await hub._init_cursors([self._watch])
        catchup = True
        while True:
            if client.closed or hub.closed:
                raise HubClosed("the event hub is shutting down")
            if client.gone and not client.buf:
                raise _deleted(self.session_id)
            if catchup or client.lagged:
                client.lagged = False
                client.clear()
                try:
                    page, caught_up = await hub.read_page(self.session_id, self.cursor,
                                                          incarnation=client.inc)
                except SessionNotFound:
                    hub._incarnation_gone(self._watch, client.inc)
                    raise
                except HistoryGone as exc:
                    reset = StreamReset(self.session_id, exc.after, exc.first_available)
                    self.cursor = reset.resume_after
                    yield reset
                    continue
                out, ended = self._take(page)
                if out:
                    yield out
                if ended:
                    return
                catchup = not caught_up
                continue
            if not client.buf:
                waiter = client.waiter = anyio.Event()
                await waiter.wait()
                continue
            items = list(client.buf)
            client.clear()
            out, ended = self._take(items)
            if out:
                yield out
            if ended:
                return
            if items and items[-1].seq > self.cursor:
                catchup = True  # a gap: read it from the log

    def _take(self, items: Sequence[HubEvent]) -> tuple[list[HubEvent], bool]:
        out: list[HubEvent] = []
        for ev in items:
            if ev.seq <= self.cursor:
                continue
            if ev.seq != self.cursor + 1:
                break
            self.cursor = ev.seq
            if self._match(ev):
                out.append(ev)
            if self.until_ended and ev.type == "session.ended":
                return out, True
        return out, False


class Hub:
    """One per process: ``async with Hub(log) as hub:`` then ``async with hub.subscribe(...)``."""

    def __init__(
        self,
        log: EventLog,
        *,
        live: LiveMode = "xread",
        buffer: int = 1024,
        buffer_bytes: int = 512 * 1024,
        page: int = 500,
        archive_page: int = 64,
        fetch_batch: int = 256,
        resync_s: float = 5.0,
        xread_block_ms: int = 100,
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        if live not in ("pubsub", "xread"):
            raise ValidationError(f"live must be 'pubsub' or 'xread', not {live!r}")
        self.log = log
        self.live: LiveMode = live
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.page = page
        self.archive_page = archive_page
        self.fetch_batch = fetch_batch
        self.resync_s = resync_s
        self.xread_block_ms = xread_block_ms
        self.on_lag = on_lag
        self.stats = HubStats()
        self.closed = False
        self.live_connected = False
        self._watches: dict[str, _Watch] = {}
        self._dirty: dict[str, _Watch] = {}
        self._dirty_event = anyio.Event()
        self._tg: TaskGroup | None = None
        self._exit: contextlib.AsyncExitStack | None = None
        # per session: how many entries of the size its last read had fit in buffer_bytes
        self._fit: dict[str, int] = {}

    # -- lifetime ----------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            if self.live == "pubsub":
                await self._tg.start(self._pubsub_loop)
                await self._tg.start(self._fetch_loop)
            else:
                await self._tg.start(self._xread_loop)
            await self._tg.start(self._sweep_loop)
        except BaseException:
            await stack.aclose()
            raise
        self._exit = stack
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the live path and end every subscription with :class:`HubClosed`."""
        self.drain()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        if self._exit is not None:
            stack, self._exit = self._exit, None
            await stack.aclose()

    @property
    def clients(self) -> int:
        return sum(len(w.clients) for w in self._watches.values())

    @property
    def watched(self) -> int:
        return len(self._watches)

    # -- subscribing -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def subscribe(
        self, session_id: str, after: int = 0, *, types: Collection[str] | None = None,
        until_ended: bool = True, incarnation: str | None = None,
    ) -> AsyncIterator[Subscription]:
        """Watch ``session_id`` from seq ``after``: its incarnation ``incarnation`` (the one
        a caller was authorized for, ``SessionInfo.incarnation``), by default the current one
        (:class:`SessionNotFound` if there is none). Registration happens before the first
        catch-up read, so nothing appended meanwhile can fall between the two."""
        if self.closed:
            raise HubClosed("the event hub is shutting down")
        if after < 0:
            raise ValidationError("after must be >= 0")
        if incarnation is None:
            incarnation = (await self.log.incarnations([session_id]))[session_id]
            if incarnation is None:
                raise SessionNotFound(session_id)
        keys = self.log.keys.session(session_id)
        client = _Client(self.buffer, self.buffer_bytes, incarnation)
        w = self._watches.get(session_id)
        if w is not None and w.inc is not None and w.inc != incarnation:
            if _newer(incarnation, w.inc):
                self._retire(w)  # the id names a newer session: the watched one is gone
                w = None
            else:
                client.gone = True  # this one is gone already
        if w is None:
            w = self._watches[session_id] = _Watch(session_id, keys.stream, keys.meta)
            self._mark(w)  # initialise its cursor on the live path
        if not client.gone:
            w.clients.add(client)
        try:
            yield Subscription(self, w, client, after, types, until_ended)
        finally:
            client.closed = True
            w.clients.discard(client)
            if not w.clients and self._watches.get(session_id) is w:
                del self._watches[session_id]
                self._dirty.pop(session_id, None)

    async def read_page(
        self, session_id: str, after: int, limit: int | None = None, *,
        incarnation: str | None = None,
    ) -> tuple[list[HubEvent], bool]:
        """One catch-up page after ``after`` (at most ``limit`` events and, past the first,
        ``buffer_bytes``) and whether it reached the end of the log. Raw entries are
        forwarded without decoding; pages needing the archive go through
        :meth:`EventLog.read`, ``archive_page`` events at a time (it raises
        :class:`HistoryGone` where history is gone everywhere). With ``incarnation``, a page
        of that incarnation or :class:`SessionNotFound`: the session's metadata is read after
        the page (in the same round trip; one more after an archive read), and incarnations
        only grow, so a page of any other passes no check."""
        limit = limit or self.page
        keys = self.log.keys.session(session_id)
        count = min(limit, self._fit.get(session_id, _FIRST_READ))
        with redis_errors("hub read"):
            if incarnation is None:
                entries = await self.log.redis.xrange(
                    keys.stream, f"({_sid(after)}", "+", count=count
                )
            else:
                async with self.log.redis.pipeline(transaction=False) as pipe:
                    pipe.xrange(keys.stream, f"({_sid(after)}", "+", count=count)
                    pipe.hmget(keys.meta, list(INCARNATION_FIELDS))
                    entries, meta = await pipe.execute()
                _expect(session_id, incarnation, current_incarnation(meta))
        if entries and _seq(entries[0][0]) == after + 1:
            page, largest = self._cut(entries)
            if len(self._fit) >= _FIT_SESSIONS:
                self._fit.clear()  # a hint, not state: forgetting costs one small read each
            self._fit[session_id] = max(1, self.buffer_bytes // largest)
            caught_up = len(page) == len(entries) < count
            return await self._events_of(page, keys.stream), caught_up
        envs = await self.log.read(session_id, after, min(limit, self.archive_page))
        if incarnation is not None:
            _expect(session_id, incarnation,
                    (await self.log.incarnations([session_id]))[session_id])
        events = [HubEvent(e.seq, e.type, client_json(e), incarnation or "") for e in envs]
        # A page from the archive stops where Redis starts, however short: only an empty read
        # says this is the end of the log.
        return events, not events

    def _cut(self, entries: list[tuple[bytes, dict[bytes, bytes]]]
             ) -> tuple[list[tuple[bytes, dict[bytes, bytes]]], int]:
        """The head of a read within ``buffer_bytes`` (past its first entry), a blob-backed
        entry alone (what it costs is only known once hydrated), and the largest entry seen."""
        used = largest = 0
        for n, (_, fields) in enumerate(entries):
            size = sum(len(k) + len(v) for k, v in fields.items())
            largest = max(largest, size)
            blob = entry_has_blob(fields)
            if n and (blob or used + size > self.buffer_bytes):
                return entries[:n], largest
            if blob:
                return entries[:1], largest
            used += size
        return entries, largest

    async def follow(self, session_id: str, after: int = 0, *, incarnation: str | None = None
                     ) -> AsyncIterator[Envelope]:
        """Every envelope after ``after``, then live, as :class:`Envelope` objects (the
        ``EnvelopeSource`` protocol of WebRTC and other followers). Raises
        :class:`HistoryGone` where history is gone everywhere, :class:`SessionNotFound` once
        the incarnation followed is gone."""
        async with self.subscribe(session_id, after, incarnation=incarnation) as sub:
            async for batch in sub.batches():
                if isinstance(batch, StreamReset):
                    raise HistoryGone(session_id, batch.after, batch.first_available)
                for ev in batch:
                    yield _envelope_decoder.decode(ev.data)

    def drain(self) -> None:
        """Shutting down: refuse new subscriptions and end every current one with
        :class:`HubClosed` (the live path keeps running until :meth:`aclose`)."""
        self.closed = True
        for w in self._watches.values():
            for c in w.clients:
                c.closed = True
                c.wake()

    # -- live path: common -------------------------------------------------------------------
    def _mark(self, w: _Watch) -> None:
        # a retired watch must not hold its session's place here for a newer one
        if not w.retired and w.session_id not in self._dirty:
            self._dirty[w.session_id] = w
            self._dirty_event.set()

    def _resync_all(self) -> None:
        self.stats.resyncs += 1
        for w in self._watches.values():
            self._mark(w)

    def _fan_out(self, w: _Watch, events: list[HubEvent]) -> None:
        if not events or w.retired:
            return
        if any(e.inc and e.inc != w.inc for e in events):
            # the stream is another incarnation's now: the one watched was deleted (or
            # expired) and its id created again
            self._retire(w)
            return
        w.cursor = events[-1].seq
        self.stats.fetched_events += len(events)
        if self.on_lag is not None:
            with contextlib.suppress(msgspec.DecodeError):
                self.on_lag(time.time() - events[-1].ts().timestamp())
        size = sum(len(e.data) for e in events)
        for c in w.clients:
            if not c.push(events, size):
                self.stats.lagged_clients += 1

    async def _events_of(self, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]],
                         where: str) -> list[HubEvent]:
        if not any(entry_has_blob(f) for _, f in entries):
            return [_event(i, f) for i, f in entries]
        envs = await self.log.hydrate(
            [decode_entry(f, where=f"{where} {i!r}") for i, f in entries]
        )
        return [HubEvent(e.seq, e.type, client_json(e), entry_incarnation(f))
                for e, (_, f) in zip(envs, entries, strict=True)]

    async def _init_cursors(self, watches: Sequence[_Watch]) -> None:
        async with self.log.redis.pipeline(transaction=False) as pipe:
            for w in watches:
                pipe.hmget(w.meta, list(INCARNATION_FIELDS))
            metas = await pipe.execute()
        for w, meta in zip(watches, metas, strict=True):
            if w.cursor is not None or w.retired:
                continue
            current = current_incarnation(meta)
            if current is None:
                self._retire(w)  # deleted (or expired) since its clients opened it
                continue
            w.cursor, w.inc = int(meta[0]), current
            for c in [c for c in w.clients if c.inc != current]:
                # subscribed for an incarnation gone by now (a newer one would have retired a
                # watch that knew its incarnation, but this one did not yet)
                w.clients.discard(c)
                _end(c)
            if w.head > w.cursor:
                self._mark(w)

    def _retire(self, w: _Watch) -> None:
        """The incarnation ``w`` follows is gone: end its clients (after what they hold, all
        of that incarnation); a later subscriber gets a watch of its own."""
        w.retired = True
        if self._watches.get(w.session_id) is w:
            del self._watches[w.session_id]
            self._dirty.pop(w.session_id, None)
        for c in w.clients:
            _end(c)

    def _incarnation_gone(self, w: _Watch, inc: str) -> None:
        """A client's read found its incarnation ``inc`` gone: so is the watch's, if the same."""
        if w.inc == inc:
            self._retire(w)

    def _check(self, w: _Watch, current: str | None) -> bool:
        """Whether the session's current incarnation is still the watch's (else retire it)."""
        if current is None or (w.inc is not None and current != w.inc):
            self._retire(w)
            return False
        return True

    async def _sweep_loop(self, *, task_status: TaskStatus[None]) -> None:
        """Catch notifications that never arrived: compare each watch's seq with its cursor."""
        task_status.started()
        while True:
            await anyio.sleep(self.resync_s)
            watches = [w for w in self._watches.values() if w.cursor is not None]
            for start in range(0, len(watches), 1000):
                chunk = watches[start : start + 1000]
                try:
                    async with self.log.redis.pipeline(transaction=False) as pipe:
                        for w in chunk:
                            pipe.hmget(w.meta, list(INCARNATION_FIELDS))
                        metas = await pipe.execute()
                except (rexc.RedisError, OSError) as exc:
                    log_.warning("hub sweep failed: %s", exc)
                    break
                for w, meta in zip(chunk, metas, strict=True):
                    if w.retired or not self._check(w, current_incarnation(meta)):
                        continue
                    if w.cursor is not None and int(meta[0]) > w.cursor:
                        self.stats.missed += 1
                        self._mark(w)

    # -- live path: pub/sub notifications ------------------------------------------------------
    async def _pubsub_loop(self, *, task_status: TaskStatus[None]) -> None:
        channels = [self.log.keys.notify(s) for s in self.log.keys.all_shards()]
        started = False
        delay = 0.05
        while True:
            pubsub = self.log.redis.pubsub()
            try:
                await pubsub.subscribe(*channels)
                async for msg in pubsub.listen():
                    kind = msg["type"]
                    if kind == "message":
                        self._on_notify(msg["data"])
                    elif kind == "subscribe" and msg["data"] == len(channels):
                        # (re)subscribed: whatever was published meanwhile is lost
                        self.live_connected = True
                        delay = 0.05
                        self._resync_all()
                        if not started:
                            started = True
                            task_status.started()
            except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
                self.live_connected = False
                log_.warning("hub notifications lost (%s); reconnecting", exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_notify(self, data: bytes) -> None:
        self.stats.notifications += 1
        sid, _, seq = data.partition(b" ")
        w = self._watches.get(sid.decode())
        if w is None:
            return
        n = int(seq)
        if n > w.head:
            w.head = n
        if w.cursor is None or n > w.cursor:
            self._mark(w)

    async def _fetch_loop(self, *, task_status: TaskStatus[None]) -> None:
        """XRANGE every dirty session after its cursor, many per round trip."""
        task_status.started()
        while True:
            if not self._dirty:
                self._dirty_event = anyio.Event()
                await self._dirty_event.wait()
            batch: list[_Watch] = []
            while self._dirty and len(batch) < self.fetch_batch:
                _, w = self._dirty.popitem()
                if self._watches.get(w.session_id) is w:
                    batch.append(w)
            try:
                await self._fetch(batch)
            except (EventcoreError, rexc.RedisError, OSError) as exc:
                log_.warning("hub fetch failed (%s); retrying", exc)
                for w in batch:
                    self._mark(w)
                await anyio.sleep(0.1)

    async def _fetch(self, batch: list[_Watch]) -> None:
        fresh = [w for w in batch if w.cursor is None]
        if fresh:
            with redis_errors("hub init"):
                await self._init_cursors(fresh)
        # a fresh watch starts live from its current seq; its clients catch up by themselves
        ready = [w for w in batch if w.cursor is not None and w not in set(fresh)]
        if not ready:
            return
        with redis_errors("hub fetch"):
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for w in ready:
                    pipe.xrange(w.stream, f"({_sid(w.cursor or 0)}", "+", count=self.page)
                results = await pipe.execute()
        self.stats.fetches += 1
        for w, entries in zip(ready, results, strict=True):
            if not entries:
                if w.head > (w.cursor or 0):
                    await self._check_gone(w)
                continue
            self._fan_out(w, await self._events_of(entries, w.stream))
            if len(entries) == self.page or w.head > (w.cursor or 0):
                self._mark(w)

    async def _check_gone(self, w: _Watch) -> None:
        if self._check(w, (await self.log.incarnations([w.session_id]))[w.session_id]):
            w.head = w.cursor or 0

    # -- live path: one multiplexed XREAD ------------------------------------------------------
    async def _xread_loop(self, *, task_status: TaskStatus[None]) -> None:
        """One blocking XREAD over every watched stream. A session watched while it blocks joins
        on the next call (its clients catch up by themselves meanwhile)."""
        self.live_connected = True
        task_status.started()
        while True:
            try:
                fresh = [w for w in self._watches.values() if w.cursor is None]
                if fresh:
                    with redis_errors("hub init"):
                        await self._init_cursors(fresh)
                self._dirty.clear()
                streams: dict[Any, Any] = {
                    w.stream: _sid(w.cursor) for w in self._watches.values()
                    if w.cursor is not None
                }
                if not streams:
                    self._dirty_event = anyio.Event()
                    with anyio.move_on_after(self.xread_block_ms / 1000):
                        await self._dirty_event.wait()
                    continue
                by_stream = {w.stream: w for w in self._watches.values()}
                with redis_errors("hub xread"):
                    got = await self.log.redis.xread(
                        streams, count=self.page, block=self.xread_block_ms
                    )
                self.live_connected = True
                self.stats.fetches += 1
                for key, entries in got or ():
                    w = by_stream.get(key.decode() if isinstance(key, bytes) else key)
                    if w is None or w.cursor is None or not entries:
                        continue
                    events = [e for e in await self._events_of(entries, w.stream)
                              if e.seq > w.cursor]
                    self._fan_out(w, events)
            except (EventcoreError, rexc.RedisError, OSError) as exc:
                self.live_connected = False
                log_.warning("hub xread failed (%s); retrying", exc)
                await anyio.sleep(0.1)


def _event(entry_id: bytes, fields: Mapping[bytes, bytes]) -> HubEvent:
    return HubEvent(_seq(entry_id), *entry_client_json(fields),
                    entry_incarnation(fields))


def _newer(a: str, b: str) -> bool:
    return (len(a), a) > (len(b), b)  # 16 digits; "" (before incarnations) is the oldest


def _deleted(session_id: str) -> SessionNotFound:
    return SessionNotFound(session_id, f"session {session_id!r} was deleted (its id may name a "
                           "new session now)")


def _expect(session_id: str, incarnation: str, current: str | None) -> None:
    if current != incarnation:
        raise _deleted(session_id)


def _end(c: _Client) -> None:
    c.gone = True
    c.wake()


def _sid(seq: int | None) -> str:
    return f"0-{seq or 0}"


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2])

