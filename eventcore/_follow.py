"""Following a session: catch-up pages, then live, with an exact seam. The one follower.

A :class:`Follower` keeps one seq cursor on one incarnation of a session. It reads pages
(:class:`PageReader`: Redis, and the archive where Redis was trimmed) until it reaches the end
of the log, then takes what its :class:`LiveSource` hands it. It takes an event only if it is
exactly ``cursor + 1``: anything at or below the cursor is a duplicate and dropped, anything
above is a gap (a trimmed page, a client buffer that overflowed) and sends it back to reading
pages from its cursor. That is the whole seam, whichever the live source:

- :class:`LogFollowers`: each follower blocks on its own XREAD (what ``EventLog.tail`` uses; it
  holds a connection per follower, fine for a few),
- the SSE hub (``eventcore.server._hub``): one shared live path fans out to many followers'
  bounded buffers.

Its stream is lists of :class:`Event` and, where history is gone from Redis and the archive,
a :class:`~eventcore.errors.HistoryGone` item, after which it goes on from
``resume_after``. It ends after ``session.ended`` (with ``until_ended``), and raises
:class:`~eventcore.errors.SessionNotFound` once the incarnation it follows is gone: a session
deleted and created again under the id is another session, and nothing of it is yielded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio
import msgspec

from . import _layout as L
from ._codec import (
    client_json,
    decode_entry,
    decode_envelope,
    encode,
    entry_client_event,
    entry_generation,
    entry_has_blob,
    entry_incarnation,
    entry_seq,
    entry_size,
    seq_id,
)
from ._envelope import Envelope
from ._keys import validate_session_id
from ._redis import redis_errors, run_script
from ._scripts import lua
from ._sessions import INCARNATION_FIELDS, current_incarnation
from .errors import (
    HistoryDiverged,
    HistoryGone,
    RedisUnavailable,
    SessionNotFound,
    ValidationError,
)

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from redis.commands.core import AsyncScript

    from ._log import EventLog

__all__ = [
    "Event",
    "FollowRetry",
    "Follower",
    "Followers",
    "LiveSource",
    "LogFollowers",
    "PageReader",
    "backoff",
    "closing_iter",
    "divergence",
    "newer_generation",
    "resolve_incarnation",
    "session_deleted",
]

T = TypeVar("T")

DIVERGE_LUA = lua("eventcore", "diverge", with_prelude=True)

Entries = Sequence[tuple[bytes, Mapping[bytes, bytes]]]

_FIRST_READ = 64  # entries a session's first page asks for, before sizes are known
_FIT_SESSIONS = 10_000


class _Ts(msgspec.Struct):
    ts: _dt.datetime


_ts_decoder = msgspec.json.Decoder(_Ts)


@dataclass(frozen=True, slots=True)
class Event:
    """One envelope as a follower hands it out: ``data`` is its client JSON (what clients
    receive: no ``server_data``), ``incarnation`` the one its entry names (``""``: the entry
    does not say), ``server_data`` its server-only JSON (``None``: it has none).

    Shared by every follower of the session on the hub, so a transport caches its framing
    on it once (:meth:`framed`)."""

    seq: int
    type: str
    data: bytes
    incarnation: str = ""
    server_data: bytes | None = None
    # the stream epoch's generation it was appended in ("" = 0) and the seq its history is
    # known good up to (None: not said); see :func:`divergence`
    generation: str = ""
    good_to: int | None = None
    _frame: bytes | None = field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def of(cls, env: Envelope, incarnation: str = "",
           generation: tuple[str, int | None] = ("", None)) -> Event:
        """The event of a decoded envelope (an archive page, a hydrated blob)."""
        sd = None if env.server_data is None else encode(env.server_data)
        return cls(env.seq, env.type, client_json(env), incarnation, sd, *generation)

    @property
    def epoch(self) -> str:
        """The stream epoch's generation as clients see it: ``"0"`` until a divergence."""
        return self.generation or "0"

    def envelope(self) -> Envelope:
        """The whole envelope, ``server_data`` included."""
        return decode_envelope(self.data, self.server_data)

    def ts(self) -> _dt.datetime:
        return _ts_decoder.decode(self.data).ts

    def framed(self, frame: Callable[[Event], bytes]) -> bytes:
        """The transport's bytes for this event, made once and shared by every client (one
        transport caches per event: SSE)."""
        out = self._frame
        if out is None:
            out = frame(self)
            object.__setattr__(self, "_frame", out)  # a cache, not part of the value
        return out


@dataclass(frozen=True, slots=True)
class FollowRetry:
    """Handed to ``on_retry`` before each wait for Redis to come back."""

    attempt: int
    delay_s: float
    last_seq: int
    error: str


def backoff(attempt: int, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff: followers of a restarted Redis must not reconnect in
    lockstep."""
    return random.uniform(0, min(cap, 0.1 * 2 ** min(attempt, 16)))


@contextlib.asynccontextmanager
async def closing_iter(it: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async generator typed as a plain iterator when the block exits (early exits
    included), so what it holds is released now rather than at garbage collection."""
    try:
        yield it
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def newer_generation(a: str, b: str) -> bool:
    """Whether generation ``a`` is newer than ``b`` (``""`` is 0; both are digits)."""
    return int(a or 0) > int(b or 0)


def divergence(session_id: str, cursor: int, generation: str, ev: Event
               ) -> HistoryDiverged | str | None:
    """What ``ev`` means to a reader that holds seqs up to ``cursor`` read in ``generation``:
    ``None`` nothing new; a generation string: a newer epoch whose history is the reader's up
    to its cursor (adopt it); :class:`HistoryDiverged`: a newer epoch that may have rewritten
    seqs the reader holds (it must discard those after ``resume_after``).

    An entry of an older generation is the surviving prefix of the reader's history (async
    replication keeps a prefix), so only newer ones count. A newer entry without ``good_to``
    belongs to an incarnation created in that generation: the reader read nothing older.

    The session's metadata decides the same way where there is no event to look at (an empty
    page at the tail): :meth:`PageReader.read` with ``generation``."""
    return _divergence(session_id, cursor, generation, ev.generation, ev.good_to)


def _divergence(session_id: str, cursor: int, generation: str, gen: str, good: int | None
                ) -> HistoryDiverged | str | None:
    """:func:`divergence` for the epoch ``gen`` known good up to ``good``."""
    if gen == generation or not newer_generation(gen, generation):
        return None
    if good is None or cursor <= good:
        return gen
    return HistoryDiverged(session_id, cursor, good, gen or "0", generation or "0")


def session_deleted(session_id: str) -> SessionNotFound:
    """The error that ends a follower whose incarnation is gone."""
    return SessionNotFound(session_id, f"session {session_id!r} was deleted (its id may name a "
                           "new session now)")


async def resolve_incarnation(log: EventLog, session_id: str, incarnation: str | None) -> str:
    """``incarnation``, or by default the session's current one (:class:`SessionNotFound`
    if there is none)."""
    validate_session_id(session_id)
    if incarnation is None:
        incarnation = (await log.incarnations([session_id]))[session_id]
        if incarnation is None:
            raise SessionNotFound(session_id)
    return incarnation


class PageReader:
    """Catch-up pages, bounded in events (``page``) and in bytes (``buffer_bytes`` past a
    page's first event; a blob-backed event is a page of its own, hydrated), so what a
    follower holds never grows with the history. Entries are forwarded without decoding their
    JSON. XRANGE bounds only a count, so each read asks for as many entries as the largest
    entry of the session's last read says fit, and the page is cut at the budget before
    anything awaits (a Lua script that stops at the budget cost twice Redis' CPU per page).
    Pages Redis no longer has come from :meth:`EventLog.read` (the archive), ``archive_page``
    events at a time."""

    def __init__(self, log: EventLog, *, page: int = 500, buffer_bytes: int = 512 * 1024,
                 archive_page: int = 64) -> None:
        self.log = log
        self.page = page
        self.buffer_bytes = buffer_bytes
        self.archive_page = archive_page
        # per session: how many entries of the size its last read had fit in buffer_bytes
        self._fit: dict[str, int] = {}
        self._diverge: AsyncScript | None = None

    async def read(
        self, session_id: str, after: int, limit: int | None = None, *,
        incarnation: str | None = None, generation: str | None = None,
    ) -> tuple[list[Event], bool]:
        """One page after ``after`` (at most ``limit`` events) and whether it reached the end
        of the log. With ``incarnation``, a page of that incarnation or
        :class:`SessionNotFound`: the session's metadata is read after the page (in the same
        round trip; one more after an archive read), and incarnations only grow, so a page of
        any other passes no check. :class:`HistoryGone` where history is gone everywhere.

        With ``generation`` too (the reader's epoch, ``""``: 0), a page that finds the reader
        caught up says whether its epoch is still the session's (from the same metadata read,
        :func:`divergence`): :class:`HistoryDiverged` where the seqs it holds were rewritten,
        exactly as the page's events would have said had there been any. A page with events
        leaves that to them."""
        limit = limit or self.page
        redis = self.log.redis
        keys = self.log.keys.session(session_id)
        count = min(limit, self._fit.get(session_id, _FIRST_READ))
        with redis_errors("follow read"):
            if incarnation is None:
                entries = await redis.xrange(keys.stream, f"({seq_id(after)}", "+", count=count)
            else:
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.xrange(keys.stream, f"({seq_id(after)}", "+", count=count)
                    pipe.hmget(keys.meta, [*INCARNATION_FIELDS, L.META_GENERATION,
                                           L.META_GENERATION_FROM])
                    entries, meta = await pipe.execute()
                _expect(session_id, incarnation, current_incarnation(meta[:2]))
                if not entries and after and int(meta[0]) < after:
                    # the cursor is beyond the tail: what the reader holds past it is gone
                    # (a failover lost it), and new appends would reuse those seqs
                    diverged = await self._beyond_tail(session_id, after, incarnation)
                    if diverged is not None:
                        raise diverged
                    return await self.read(session_id, after, limit, incarnation=incarnation,
                                           generation=generation)
                if not entries and int(meta[0] or 0) == after:
                    # caught up (the metadata is read after the page): not an archive read,
                    # whose envelopes would lose their stream generation if an append landed
                    # between the two
                    if generation is not None:
                        # no event tells a stale epoch at the tail: the metadata does (the
                        # seqs up to the cursor may be another history's by now)
                        changed = _divergence(session_id, after, generation,
                                              _text(meta[2]), _int(meta[3]))
                        if isinstance(changed, HistoryDiverged):
                            raise changed
                    return [], True
        if entries and entry_seq(entries[0][0]) == after + 1:
            page, largest = self._cut(entries)
            if len(self._fit) >= _FIT_SESSIONS:
                self._fit.clear()  # a hint, not state: forgetting costs one small read each
            self._fit[session_id] = max(1, self.buffer_bytes // largest)
            caught_up = len(page) == len(entries) < count
            return await self.events_of(page, keys.stream), caught_up
        envs = await self.log.read(session_id, after, min(limit, self.archive_page))
        if incarnation is not None:
            _expect(session_id, incarnation,
                    (await self.log.incarnations([session_id]))[session_id])
        events = [Event.of(e, incarnation or "") for e in envs]
        # A page from the archive stops where Redis starts, however short: only an empty read
        # says this is the end of the log.
        return events, not events

    async def _beyond_tail(self, session_id: str, after: int, incarnation: str
                           ) -> HistoryDiverged | None:
        """Give the session a new generation (unless it was appended to meanwhile), so every
        reader that saw the lost seqs is told once they are reused; the reset for this one."""
        log = self.log
        keys = log.keys.session(session_id)
        if self._diverge is None:
            self._diverge = log.redis.register_script(DIVERGE_LUA)
        with redis_errors("follow read"):
            got = await run_script(self._diverge, [keys.meta, log.keys.epoch(keys.shard)],
                                   [after, incarnation])
        if not got:
            raise session_deleted(session_id)
        gen, good = _text(got[1]), int(got[2])
        if good < 0:
            return None  # appended meanwhile: read again
        return HistoryDiverged(session_id, after, good, gen or "0")

    def _cut(self, entries: list[tuple[bytes, dict[bytes, bytes]]]
             ) -> tuple[list[tuple[bytes, dict[bytes, bytes]]], int]:
        """The head of a read within ``buffer_bytes`` (past its first entry), a blob-backed
        entry alone (what it costs is only known once hydrated), and the largest entry seen."""
        used = largest = 0
        for n, (_, fields) in enumerate(entries):
            size = entry_size(fields)
            largest = max(largest, size)
            blob = entry_has_blob(fields)
            if n and (blob or used + size > self.buffer_bytes):
                return entries[:n], largest
            if blob:
                return entries[:1], largest
            used += size
        return entries, largest

    async def events_of(self, entries: Entries, where: str) -> list[Event]:
        """The events of stream entries, blob-backed payloads hydrated."""
        if not any(entry_has_blob(f) for _, f in entries):
            return [Event(*entry_client_event(i, f), *entry_generation(f)) for i, f in entries]
        envs = await self.log.hydrate(
            [decode_entry(f, where=f"{where} {i!r}") for i, f in entries]
        )
        return [Event.of(e, entry_incarnation(f), entry_generation(f))
                for e, (_, f) in zip(envs, entries, strict=True)]


ReadPage = Callable[[int, str], Awaitable[tuple[list[Event], bool]]]
"""A follower's page read: after its cursor, in its generation (:meth:`PageReader.read`)."""


class LiveSource(Protocol):
    """Where a caught-up follower gets its next events: the log's own blocking read for one
    follower (:class:`LogFollowers`), the hub's fan-out for many. Either may hand out
    duplicates and gaps; the follower sorts them out by seq. Raising ends the follow
    (:class:`SessionNotFound` once the incarnation is gone)."""

    def rewind(self) -> None:
        """The follower is about to read pages from its cursor: forget what is buffered."""

    async def next(self, cursor: int) -> Sequence[Event] | None:
        """Events after ``cursor`` once there are some, or ``None``: read pages instead (it
        fell behind, or it found nothing for a while)."""


class Follower:
    """One follower of one incarnation of a session from seq ``after``: iterate
    :meth:`batches` (or :meth:`envelopes`). ``cursor`` is the last seq covered (types
    filtered out included), ``generation`` the stream epoch's generation it was read in
    (``""``: 0; set it before iterating to resume a reader that was on another one).

    Epochs: an event of a newer generation that may have rewritten seqs up to the cursor, or
    a cursor beyond the stream's tail, is a :class:`~eventcore.errors.HistoryDiverged` item
    (the one reset, a :class:`~eventcore.errors.HistoryGone`): the follower then goes on from
    its ``resume_after`` in the new generation, never silently past reused seqs.

    With ``retry_cap_s``, a Redis outage longer than the client's retry budget does not end
    it: it waits (jittered backoff up to that cap, ``on_retry`` told first) and goes on from
    its cursor, so nothing is repeated or skipped."""

    def __init__(
        self, session_id: str, read_page: ReadPage, live: LiveSource, after: int = 0, *,
        types: Collection[str] | None = None, until_ended: bool = True,
        retry_cap_s: float | None = None, on_retry: Callable[[FollowRetry], None] | None = None,
    ) -> None:
        if type(after) is not int or after < 0:
            raise ValidationError(f"after must be an int >= 0, got {after!r:.20}")
        self.session_id = session_id
        self.cursor = after
        self.types = frozenset(types) if types else None
        self.until_ended = until_ended
        self.retry_cap_s = retry_cap_s
        self.on_retry = on_retry
        self.generation = ""
        self._read_page = read_page
        self._live = live

    async def batches(self) -> AsyncIterator[list[Event] | HistoryGone]:
        """Non-empty lists of events in seq order (filtered by ``types``), and a
        :class:`HistoryGone` where history is gone, after which it goes on from its
        ``resume_after``."""
        live = self._live
        catchup = True
        attempt = 0
        while True:
            gone: HistoryGone | None = None
            items: Sequence[Event]
            try:
                if catchup:
                    live.rewind()
                    try:
                        items, caught_up = await self._read_page(self.cursor, self.generation)
                    except HistoryDiverged as exc:
                        gone, items, caught_up = exc, [], False
                    except HistoryGone as exc:
                        if exc.first_available <= self.cursor + 1:
                            raise  # nothing to skip to: going on would read the same again
                        gone, items, caught_up = exc, [], False
                    catchup = not caught_up
                else:
                    got = await live.next(self.cursor)
                    if got is None:
                        catchup = True
                        continue
                    items = got
            except RedisUnavailable as exc:
                if self.retry_cap_s is None:
                    raise
                attempt += 1
                delay = backoff(attempt, self.retry_cap_s)
                if self.on_retry is not None:
                    self.on_retry(FollowRetry(attempt, delay, self.cursor, str(exc)))
                await anyio.sleep(delay)
                catchup = True
                continue
            attempt = 0
            if gone is not None:
                self.cursor = gone.resume_after
                if isinstance(gone, HistoryDiverged):
                    self.generation = "" if gone.epoch == "0" else gone.epoch
                    catchup = True
                yield gone
                continue
            out, ended, diverged = self._take(items)
            if out:
                yield out
            if diverged is not None:
                self.cursor = diverged.resume_after
                self.generation = "" if diverged.epoch == "0" else diverged.epoch
                catchup = True
                yield diverged
                continue
            if ended:
                return
            if not catchup and items and items[-1].seq > self.cursor:
                catchup = True  # a gap: read it from the log

    async def envelopes(self) -> AsyncIterator[Envelope]:
        """The events as whole envelopes; history gone everywhere raises
        :class:`HistoryGone`."""
        async for batch in self.batches():
            if isinstance(batch, HistoryGone):
                raise batch
            for ev in batch:
                yield ev.envelope()

    def _take(self, items: Sequence[Event]) -> tuple[list[Event], bool, HistoryDiverged | None]:
        out: list[Event] = []
        types = self.types
        for ev in items:
            if ev.generation != self.generation:
                # checked before the seq: a reused seq at or below the cursor is no duplicate
                changed = divergence(self.session_id, self.cursor, self.generation, ev)
                if isinstance(changed, HistoryDiverged):
                    return out, False, changed
                if changed is not None:
                    self.generation = changed
            if ev.seq <= self.cursor:
                continue
            if ev.seq != self.cursor + 1:
                break
            self.cursor = ev.seq
            if types is None or ev.type in types:
                out.append(ev)
            if self.until_ended and ev.type == "session.ended":
                return out, True, None
        return out, False, None


class Followers(Protocol):
    """Where followers come from: :class:`LogFollowers`, or the SSE hub (which shares one
    live path between all of its followers)."""

    def subscribe(
        self, session_id: str, after: int = 0, *, types: Collection[str] | None = None,
        until_ended: bool = True, incarnation: str | None = None,
        retry_cap_s: float | None = None, on_retry: Callable[[FollowRetry], None] | None = None,
    ) -> AbstractAsyncContextManager[Follower]:
        """A follower of ``session_id`` after ``after``: of its incarnation ``incarnation``
        (the one a caller was authorized for), by default the current one
        (:class:`SessionNotFound` if there is none)."""
        ...


class LogFollowers:
    """:class:`Followers` straight from the log: each reads its own pages and blocks on its
    own XREAD (up to ``block_ms``, then it re-reads a page, which notices trims and the end of
    its incarnation). One connection per waiting follower: for many, use the SSE hub."""

    def __init__(self, log: EventLog, *, page: int = 500, block_ms: int = 2000) -> None:
        self.log = log
        self.pages = PageReader(log, page=page)
        self.block_ms = block_ms

    @contextlib.asynccontextmanager
    async def subscribe(
        self, session_id: str, after: int = 0, *, types: Collection[str] | None = None,
        until_ended: bool = True, incarnation: str | None = None,
        retry_cap_s: float | None = None, on_retry: Callable[[FollowRetry], None] | None = None,
    ) -> AsyncIterator[Follower]:
        """See :class:`Followers`."""
        inc = await resolve_incarnation(self.log, session_id, incarnation)
        pages = self.pages

        async def read_page(cursor: int, generation: str) -> tuple[list[Event], bool]:
            return await pages.read(session_id, cursor, incarnation=inc, generation=generation)

        yield Follower(session_id, read_page, _LogLive(self, session_id, inc), after,
                       types=types, until_ended=until_ended, retry_cap_s=retry_cap_s,
                       on_retry=on_retry)


class _LogLive:
    """:class:`LiveSource` of one follower: its own blocking XREAD."""

    def __init__(self, owner: LogFollowers, session_id: str, incarnation: str) -> None:
        self.owner = owner
        self.session_id = session_id
        self.incarnation = incarnation
        self.stream = owner.log.keys.session(session_id).stream

    def rewind(self) -> None:
        pass  # nothing buffered

    async def next(self, cursor: int) -> Sequence[Event] | None:
        owner = self.owner
        with redis_errors("follow"):
            got = await owner.log.redis.xread({self.stream: seq_id(cursor)},
                                              count=owner.pages.page, block=owner.block_ms)
        events: list[Event] = []
        for _, entries in got or ():
            events += await owner.pages.events_of(entries, self.stream)
        if not events:
            return None
        if any(e.incarnation and e.incarnation != self.incarnation for e in events):
            raise session_deleted(self.session_id)  # the id names another session now
        return events


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _int(value: object) -> int | None:
    text = _text(value)
    return int(text) if text.isdigit() else None


def _expect(session_id: str, incarnation: str, current: str | None) -> None:
    if current != incarnation:
        raise session_deleted(session_id)
