"""The SSE hub: one per API process, copying each watched session's events to all its clients.

Not a consumer group (a group would split events between clients instead of copying them).

- **Catch-up** is a client's own pages from its cursor (:class:`~eventcore._follow.PageReader`:
  bounded in entries and bytes, raw entries forwarded undecoded, the archive where Redis was
  trimmed), so a client resuming from seq 0 never slows anyone else.
- **Live** is one path for the whole process: either one multiplexed XREAD over all watched streams
  (the default), or the pub/sub notifications the append script publishes (``"<sid> <last_seq>"``
  lines on each shard's ``notify`` channel), after which the hub XRANGEs every dirty session once in
  one pipelined round trip. ``benchmarks/sse.py`` measures both: equal up to 1,000 clients, XREAD
  ahead beyond (pub/sub pays a second round trip per event, and redis-py's pub/sub parsing). A
  session watched while the XREAD blocks joins on the next call (at most ``xread_block_ms``); its
  clients catch up by themselves meanwhile.
- **The seam is exact**: each client is a :class:`~eventcore._follow.Follower` (the one follower
  of the project) whose live source is its buffer here. It takes an event only if it is
  exactly ``cursor + 1``; a gap (a missed notification, a buffer overflow) sends it back to
  catch-up pages from its cursor.
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

- **Direct delivery** (:meth:`Subscription.deliver_directly`, SSE's): a caught-up follower
  (parked on its empty buffer, so everything handed to it before has been delivered) whose
  transport can write at once is handed the next events inside the fan-out, synchronously:
  no task wake-up per event per client. Only the plain case (exactly the next seqs of its
  generation, not ``session.ended``), and only if the transport takes all of it; anything
  else is buffered as above. ``direct=False`` turns it off (``benchmarks/sse.py
  --modes xread-queued``). ``xread_interval_ms`` spaces the live XREADs (at most one per
  interval; 0, the default, does not).

The hub is transport-neutral (a :class:`~eventcore._follow.Followers`): SSE and the WebRTC data
channel both iterate :meth:`Subscription.batches` and format :class:`~eventcore._follow.Event`
themselves.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import msgspec
import redis.exceptions as rexc
from anyio.abc import TaskGroup, TaskStatus

from eventcore import Envelope, EventLog, SessionNotFound
from eventcore._channels import Channels, Lost, Message, Subscribed
from eventcore._codec import seq_id
from eventcore._follow import (
    Event,
    Follower,
    FollowRetry,
    PageReader,
    resolve_incarnation,
    session_deleted,
)
from eventcore._redis import is_cluster, redis_errors
from eventcore._sessions import INCARNATION_FIELDS, current_incarnation
from eventcore.errors import EventcoreError, HubClosed, ValidationError

__all__ = ["Hub", "HubClosed", "HubStats", "Subscription"]

log_ = logging.getLogger("eventcore.hub")

LiveMode = Literal["pubsub", "xread"]


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
    """One follower's bounded buffer: its :class:`~eventcore._follow.LiveSource`."""

    __slots__ = ("buf", "closed", "direct", "gone", "inc", "lagged", "limit", "limit_bytes",
                 "session_id", "size", "waiter")

    def __init__(self, session_id: str, limit: int, limit_bytes: int, inc: str) -> None:
        self.session_id = session_id
        self.inc = inc  # the incarnation it follows
        self.buf: collections.deque[Event] = collections.deque()
        self.size = 0  # bytes of client JSON in buf
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.lagged = False
        self.gone = False
        self.closed = False
        self.waiter: anyio.Event | None = None
        # the transport's synchronous delivery (Subscription.deliver_directly), if it has one
        self.direct: Callable[[Sequence[Event]], bool] | None = None

    def push(self, events: Sequence[Event], size: int) -> bool:
        """Queue without ever waiting; False if the client overflowed (it then catches up).

        A follower parked on its empty buffer (``waiter``: everything handed to it before has
        been delivered) whose transport delivers directly takes the events at once instead,
        without waking its task; the transport refuses whatever is not the plain case."""
        if self.lagged:
            return True
        direct = self.direct
        if (direct is not None and self.waiter is not None and not self.buf
                and not self.closed and direct(events)):
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

    # -- LiveSource ----------------------------------------------------------------------------
    def rewind(self) -> None:
        if self.closed:
            raise HubClosed("the event hub is shutting down")
        if self.gone:
            raise session_deleted(self.session_id)
        self.lagged = False
        self.clear()

    async def next(self, cursor: int) -> Sequence[Event] | None:
        while True:
            if self.closed:
                raise HubClosed("the event hub is shutting down")
            if self.lagged:
                return None  # overflowed: catch up with pages at its own pace
            if self.buf:
                items = list(self.buf)
                self.clear()
                return items
            if self.gone:
                raise session_deleted(self.session_id)
            waiter = self.waiter = _new_event()
            await waiter.wait()


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


class Subscription(Follower):
    """One client's :class:`~eventcore._follow.Follower` of one incarnation of a session:
    iterate :meth:`batches`. Raises :class:`HubClosed` when the hub shuts down."""

    def __init__(
        self, hub: Hub, watch: _Watch, client: _Client, after: int,
        types: Collection[str] | None, until_ended: bool, retry_cap_s: float | None,
        on_retry: Callable[[FollowRetry], None] | None,
    ) -> None:
        super().__init__(watch.session_id, self._page, client, after, types=types,
                         until_ended=until_ended, retry_cap_s=retry_cap_s, on_retry=on_retry)
        self._hub = hub
        self._watch = watch
        self.incarnation = client.inc

    def deliver_directly(self, deliver: Callable[[list[Event]], bool]) -> None:
        """Let the live path hand this follower's events to ``deliver`` synchronously while it
        is caught up (parked on its empty buffer), instead of waking its task to iterate
        :meth:`batches`. ``deliver(events)`` (non-empty, in seq order, ``types`` applied) must
        deliver all of them, or return False having delivered nothing; the follower's cursor
        moves only once it returned True. Only the plain case goes this way: a batch that is
        not exactly the next events of the follower's generation, or that ends the session,
        is buffered for :meth:`batches` as ever.

        A follower that takes the whole batch gets the fan-out's own list, the same object for
        every such follower of the session: ``deliver`` may cache what it makes of it by
        identity (SSE frames a batch once for all its streams). Work worth doing once per
        fan-out rather than per follower (a metrics counter) goes in :meth:`Hub.after_fan_out`."""
        client = self._live
        assert isinstance(client, _Client)
        if not self._hub.direct:
            return

        def direct(items: Sequence[Event]) -> bool:
            cursor = self.cursor
            generation = self.generation
            types = self.types
            until_ended = self.until_ended
            out: list[Event] = []
            for ev in items:
                if ev.generation != generation or (until_ended and ev.type == "session.ended"):
                    return False
                if ev.seq <= cursor:
                    continue  # a duplicate
                if ev.seq != cursor + 1:
                    return False  # a gap: batches() reads it from the log
                cursor = ev.seq
                if types is None or ev.type in types:
                    out.append(ev)
            if len(out) == len(items) and isinstance(items, list):
                out = items  # the whole batch: the list every such follower gets
            if out and not deliver(out):
                return False
            self.cursor = cursor
            return True

        client.direct = direct

    async def _page(self, cursor: int, generation: str) -> tuple[list[Event], bool]:
        try:
            return await self._hub.read_page(self.session_id, cursor,
                                             incarnation=self.incarnation,
                                             generation=generation)
        except SessionNotFound:
            self._hub._incarnation_gone(self._watch, self.incarnation)
            raise


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
        xread_interval_ms: float = 0.0,
        direct: bool = True,
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        if live not in ("pubsub", "xread"):
            raise ValidationError(f"live must be 'pubsub' or 'xread', not {live!r}")
        self.log = log
        self.live: LiveMode = live
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.page = page
        self.pages = PageReader(log, page=page, buffer_bytes=buffer_bytes,
                                archive_page=archive_page)
        self.fetch_batch = fetch_batch
        self.resync_s = resync_s
        self.xread_block_ms = xread_block_ms
        self.xread_interval_ms = xread_interval_ms
        self.direct = direct  # whether Subscription.deliver_directly takes effect
        self.on_lag = on_lag
        self.stats = HubStats()
        self.closed = False
        self.live_connected = False
        self._watches: dict[str, _Watch] = {}
        # The live XREAD's arguments, kept up to date rather than rebuilt per call: every
        # registered watch by stream key, and the cursor id of each whose cursor is set
        # (``_ids`` covers ``_watches`` exactly when none waits for its cursor), packed as
        # the command carries them (:func:`_bulk`); the streams' part of the command is
        # packed again only once a stream joined or left (``_keys_packed`` None).
        self._by_stream: dict[str, _Watch] = {}
        self._ids: dict[str, bytes] = {}  # stream -> _bulk(seq_id(cursor))
        self._keys_packed: bytes | None = None  # _bulk of each stream in _ids, in its order
        self._dirty: dict[str, _Watch] = {}
        self._dirty_event = anyio.Event()
        self._tg: TaskGroup | None = None
        self._cluster = False
        self._after_fan_out: list[Callable[[], None]] = []

    # -- lifetime ----------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self.run)
        except BaseException as exc:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.drain()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(et, e, tb)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The live path and its sweep, until cancelled; started once the live path is.

        On Redis Cluster, a command's keys must all be in one slot (a shard's), even on one
        node: a blocking XREAD can watch one shard only. So there both modes take the sharded
        notifications (one connection per master, :mod:`eventcore._channels`), and "xread"
        fetches the dirty sessions with one XREAD per shard instead of one XRANGE per session
        (:meth:`_xread_shards`): connections grow with the masters, never with the shards."""
        self._cluster = is_cluster(self.log.redis)
        async with anyio.create_task_group() as tg:
            if self.live == "pubsub" or self._cluster:
                await tg.start(self._pubsub_loop)
                await tg.start(self._fetch_loop)
            else:
                await tg.start(self._xread_loop)
            await tg.start(self._sweep_loop)
            task_status.started()

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
        retry_cap_s: float | None = None, on_retry: Callable[[FollowRetry], None] | None = None,
    ) -> AsyncIterator[Subscription]:
        """Watch ``session_id`` from seq ``after``: its incarnation ``incarnation`` (the one
        a caller was authorized for, ``SessionInfo.incarnation``), by default the current one
        (:class:`SessionNotFound` if there is none). Registration happens before the first
        catch-up read, so nothing appended meanwhile can fall between the two. The
        :class:`~eventcore._follow.Followers` of an API process."""
        if self.closed:
            raise HubClosed("the event hub is shutting down")
        if after < 0:
            raise ValidationError("after must be >= 0")
        incarnation = await resolve_incarnation(self.log, session_id, incarnation)
        keys = self.log.keys.session(session_id)
        client = _Client(session_id, self.buffer, self.buffer_bytes, incarnation)
        w = self._watches.get(session_id)
        if w is not None and w.inc is not None and w.inc != incarnation:
            if _newer(incarnation, w.inc):
                self._retire(w)  # the id names a newer session: the watched one is gone
                w = None
            else:
                client.gone = True  # this one is gone already
        if w is None:
            w = self._watches[session_id] = _Watch(session_id, keys.stream, keys.meta)
            self._by_stream[w.stream] = w
            self._mark(w)  # initialise its cursor on the live path
        if not client.gone:
            w.clients.add(client)
        try:
            if w.cursor is None and not client.gone:
                # The live path fans out only after the watch's cursor. Setting it before this
                # client's first catch-up read makes that read cover everything up to it; left
                # to the fetch loop, an append landing between this client's catch-up and the
                # cursor's initialisation reached neither path.
                with redis_errors("hub init"):
                    await self._init_cursors([w])
            yield Subscription(self, w, client, after, types, until_ended, retry_cap_s,
                               on_retry)
        finally:
            client.closed = True
            client.direct = None  # (it refers back to the subscription)
            w.clients.discard(client)
            if not w.clients and self._watches.get(session_id) is w:
                self._unregister(w)

    async def read_page(
        self, session_id: str, after: int, limit: int | None = None, *,
        incarnation: str | None = None, generation: str | None = None,
    ) -> tuple[list[Event], bool]:
        """One catch-up page (:meth:`PageReader.read <eventcore._follow.PageReader.read>`)."""
        return await self.pages.read(session_id, after, limit, incarnation=incarnation,
                                     generation=generation)

    async def follow(self, session_id: str, after: int = 0, *, incarnation: str | None = None
                     ) -> AsyncIterator[Envelope]:
        """Every envelope after ``after``, then live (the ``EnvelopeSource`` of other
        followers). Raises :class:`~eventcore.HistoryGone` where history is gone everywhere,
        :class:`SessionNotFound` once the incarnation followed is gone."""
        async with self.subscribe(session_id, after, incarnation=incarnation) as sub:
            async for env in sub.envelopes():
                yield env

    def drain(self) -> None:
        """Shutting down: refuse new subscriptions and end every current one with
        :class:`HubClosed` (the live path keeps running until the hub exits)."""
        self.closed = True
        for w in self._watches.values():
            for c in w.clients:
                c.closed = True
                c.wake()

    def after_fan_out(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after each round of the live path's fan-out (one XREAD's or fetch's
        sessions, in the same step): for transports' bookkeeping of direct deliveries done
        once per round instead of once per follower."""
        self._after_fan_out.append(fn)

    def _fanned_out(self) -> None:
        for fn in self._after_fan_out:
            try:
                fn()
            except Exception:  # a transport's bookkeeping must not stop the live path
                log_.exception("hub after_fan_out callback failed")

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

    def _fan_out(self, w: _Watch, events: list[Event]) -> None:
        if not events or w.retired:
            return
        if any(e.incarnation and e.incarnation != w.inc for e in events):
            # the stream is another incarnation's now: the one watched was deleted (or
            # expired) and its id created again
            self._retire(w)
            return
        self._set_cursor(w, events[-1].seq)
        self.stats.fetched_events += len(events)
        if self.on_lag is not None:
            with contextlib.suppress(msgspec.DecodeError):
                self.on_lag(time.time() - events[-1].ts().timestamp())
        size = sum(len(e.data) for e in events)
        for c in w.clients:
            if not c.push(events, size):
                self.stats.lagged_clients += 1

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
            cursor = int(meta[0])
            w.inc = current
            self._set_cursor(w, cursor)
            for c in [c for c in w.clients if c.inc != current]:
                # subscribed for an incarnation gone by now (a newer one would have retired a
                # watch that knew its incarnation, but this one did not yet)
                w.clients.discard(c)
                _end(c)
            if w.head > cursor:
                self._mark(w)

    def _retire(self, w: _Watch) -> None:
        """The incarnation ``w`` follows is gone: end its clients (after what they hold, all
        of that incarnation); a later subscriber gets a watch of its own."""
        w.retired = True
        if self._watches.get(w.session_id) is w:
            self._unregister(w)
        for c in w.clients:
            _end(c)

    def _unregister(self, w: _Watch) -> None:
        del self._watches[w.session_id]
        self._dirty.pop(w.session_id, None)
        self._by_stream.pop(w.stream, None)
        if self._ids.pop(w.stream, None) is not None:
            self._keys_packed = None

    def _set_cursor(self, w: _Watch, cursor: int) -> None:
        w.cursor = cursor
        if self._by_stream.get(w.stream) is w:
            ids = self._ids
            if w.stream not in ids:
                self._keys_packed = None  # (a value replaced keeps its place in the dict)
            ids[w.stream] = _bulk(seq_id(cursor).encode())

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
        async with Channels(self.log.redis, channels) as listener:
            self.live_connected = True
            task_status.started()
            async for event in listener:
                if type(event) is Message:
                    self._on_notify(event.data)
                elif type(event) is Subscribed:
                    # (re)subscribed: whatever was published meanwhile is lost
                    self.live_connected = listener.connected
                    self._resync_all()
                elif type(event) is Lost:
                    self.live_connected = False
                    log_.warning("hub notifications lost (%s); reconnecting", event.error)

    def _on_notify(self, data: bytes) -> None:
        """One script call's notes: ``"<sid> <last_seq>"``, one a line. A note that is not
        one (anything another client published on the channel) is skipped."""
        self.stats.notifications += 1
        watches = self._watches
        for note in data.split(b"\n"):
            sid, _, seq = note.partition(b" ")
            w = watches.get(sid.decode(errors="replace"))
            if w is None or not seq.isdigit():
                continue
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
            if self.live == "xread":  # (Redis Cluster): one XREAD per shard, see run()
                results = await self._xread_shards(ready)
            else:
                async with self.log.redis.pipeline(transaction=False) as pipe:
                    for w in ready:
                        pipe.xrange(w.stream, f"({seq_id(w.cursor)}", "+", count=self.page)
                    results = await pipe.execute()
        self.stats.fetches += 1
        try:
            for w, entries in zip(ready, results, strict=True):
                if not entries:
                    if w.head > (w.cursor or 0):
                        await self._check_gone(w)
                    continue
                self._fan_out(w, await self.pages.events_of(entries, w.stream))
                if len(entries) == self.page or w.head > (w.cursor or 0):
                    self._mark(w)
        finally:
            self._fanned_out()

    async def _xread_shards(self, ready: list[_Watch]) -> list[Any]:
        """The entries after each watch's cursor: one XREAD per shard over its watches'
        streams (a command's keys must share a slot), all in one pipeline, which the cluster
        client sends as one round trip per master, the masters in parallel."""
        by_shard: dict[int, list[_Watch]] = {}
        for w in ready:
            by_shard.setdefault(self.log.keys.shard_of(w.session_id), []).append(w)
        groups = list(by_shard.values())
        async with self.log.redis.pipeline(transaction=False) as pipe:
            for group in groups:
                pipe.xread({w.stream: seq_id(w.cursor or 0) for w in group}, count=self.page)
            replies = await pipe.execute()
        got: dict[str, Any] = {}
        for reply in replies:
            for key, entries in reply or ():
                got[key.decode() if isinstance(key, bytes) else key] = entries
        return [got.get(w.stream, []) for w in ready]

    async def _check_gone(self, w: _Watch) -> None:
        if self._check(w, (await self.log.incarnations([w.session_id]))[w.session_id]):
            w.head = w.cursor or 0

    # -- live path: one multiplexed XREAD ------------------------------------------------------
    async def _xread_loop(self, *, task_status: TaskStatus[None]) -> None:
        """One blocking XREAD over every watched stream. A session watched while it blocks joins
        on the next call (its clients catch up by themselves meanwhile).

        It runs on a connection of the hub's own (:meth:`_live_connection`), held for the
        loop's life, not one checked out of the pool per call: a checkout costs a lock, a
        timeout and a poll of the socket that takes a turn of the event loop (redis-py's
        ``ensure_connection``), per call, ahead of the call. Errors are retried on it as
        redis-py retries a command (the client's retry policy; a lost connection is opened
        again), the reply parsed by redis-py's own XREAD callback."""
        self.live_connected = True
        task_status.started()
        interval = self.xread_interval_ms / 1000
        started = -math.inf
        conn = self._live_connection()
        parse = self.log.redis.response_callbacks["XREAD"]

        head = b"".join(_bulk(str(a).encode()) for a in (
            "XREAD", "COUNT", self.page, "BLOCK", self.xread_block_ms, "STREAMS"))

        async def xread() -> Any:
            streams = self._ids
            # Packed here, before the first await (``streams`` changes), by hand: hiredis packs
            # the ~2 arguments per watched stream at ~0.25 us each, per call; here the streams'
            # part is reused until one joins or leaves, and the ids are packed as they move.
            keys = self._keys_packed
            if keys is None:
                keys = self._keys_packed = b"".join([_bulk(k.encode()) for k in streams])
            command = b"*%d\r\n%b%b%b" % (6 + 2 * len(streams), head, keys,
                                          b"".join(streams.values()))

            async def once() -> Any:
                await conn.send_packed_command(command, check_health=False)
                return await conn.read_response()

            return parse(await conn.retry.call_with_retry(once, lambda _: conn.disconnect()))

        try:
            while True:
                try:
                    if interval:
                        # at most one XREAD per interval: under load each call (and each
                        # client's write) carries more events, at the cost of up to the
                        # interval in latency
                        wait = started + interval - time.monotonic()
                        if wait > 0:
                            await anyio.sleep(wait)
                        started = time.monotonic()
                    if len(self._ids) != len(self._watches):
                        fresh = [w for w in self._watches.values() if w.cursor is None]
                        if fresh:
                            with redis_errors("hub init"):
                                await self._init_cursors(fresh)
                    self._dirty.clear()
                    streams = self._ids
                    if not streams:
                        self._dirty_event = anyio.Event()
                        with anyio.move_on_after(self.xread_block_ms / 1000):
                            await self._dirty_event.wait()
                        continue
                    # the watches the call is for (a stream's entries are its watch's: one for
                    # a newer incarnation registered meanwhile is another's)
                    by_stream = self._by_stream.copy()
                    with redis_errors("hub xread"):
                        got = await xread()
                    self.live_connected = True
                    self.stats.fetches += 1
                    try:
                        for key, entries in got or ():
                            w = by_stream.get(key.decode() if isinstance(key, bytes) else key)
                            if w is None or w.cursor is None or not entries:
                                continue
                            events = [e for e in await self.pages.events_of(entries, w.stream)
                                      if e.seq > w.cursor]
                            self._fan_out(w, events)
                    finally:
                        if got:
                            self._fanned_out()
                except (EventcoreError, rexc.RedisError, OSError) as exc:
                    self.live_connected = False
                    log_.warning("hub xread failed (%s); retrying", exc)
                    await anyio.sleep(0.1)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.disconnect()

    def _live_connection(self) -> Any:
        """A connection like the pool's, outside it, named ``eventcore-hub-<namespace>`` (so
        ``CLIENT LIST`` tells the hub's blocking XREAD from the pool's connections)."""
        pool: Any = self.log.redis.connection_pool
        return pool.connection_class(**{
            **pool.connection_kwargs,
            "client_name": f"eventcore-hub-{self.log.keys.namespace}",
        })


_event_type: type[anyio.Event] | None = None


def _new_event() -> anyio.Event:
    """``anyio.Event()`` without its per-call backend lookup (one per client wait, the
    fan-out's hot path): the running backend's event class, looked up once."""
    global _event_type
    if _event_type is None:
        _event_type = type(anyio.Event())
    return _event_type()


def _bulk(arg: bytes) -> bytes:
    """``arg`` as a RESP bulk string, the form a command's arguments take."""
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def _newer(a: str, b: str) -> bool:
    return (len(a), a) > (len(b), b)  # 16 digits; "" (before incarnations) is the oldest


def _end(c: _Client) -> None:
    c.gone = True
    c.wake()
