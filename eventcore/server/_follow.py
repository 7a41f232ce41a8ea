"""Following a session live, resuming after outages from the last seq delivered.

Two shapes: :func:`follow_log` yields decoded envelopes straight from the log (``eventcore
tail``), and :class:`EventSource` yields batches of already-encoded client events (what
transports send: the SSE hub's :class:`~subscribers.HubEvent` satisfies :class:`ClientEvent`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio

from eventcore._codec import client_json
from eventcore._envelope import Envelope
from eventcore._log import EventLog
from eventcore.errors import HistoryGone, RedisUnavailable

if TYPE_CHECKING:
    from eventcore.server._hub import Hub

__all__ = [
    "ClientEvent",
    "EventSource",
    "FollowRetry",
    "Gap",
    "HubSource",
    "LogSource",
    "closing_iter",
    "follow_log",
]

T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class FollowRetry:
    """Handed to ``on_retry`` callbacks before each wait for Redis to come back."""

    attempt: int
    delay_s: float
    last_seq: int
    error: str


@dataclass(frozen=True, slots=True)
class Gap:
    """History after ``after`` is gone everywhere; the stream continues at
    ``first_available``."""

    after: int
    first_available: int


def backoff(attempt: int, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff: followers of a restarted Redis must not reconnect in
    lockstep."""
    return random.uniform(0, min(cap, 0.1 * 2 ** min(attempt, 16)))


async def follow_log(
    log: EventLog,
    session_id: str,
    after: int = 0,
    *,
    until_ended: bool = True,
    backoff_cap_s: float = 5.0,
    on_retry: Callable[[FollowRetry], None] | None = None,
    on_live: Callable[[int], None] | None = None,
    on_gap: Callable[[Gap], None] | None = None,
) -> AsyncIterator[Envelope]:
    """Every envelope after ``after``, then live, across Redis restarts.

    :meth:`EventLog.tail` already retries transient errors within the client's retry budget;
    an outage longer than that raises :class:`RedisUnavailable`, and this loop waits and
    resumes from the last seq it yielded, so nothing is repeated or skipped. ``on_live`` is
    called with the last seq each time the follower (re)starts reading. History gone from
    Redis and the archive raises :class:`HistoryGone`, unless ``on_gap`` is given: it is told,
    and following continues at the first seq still available."""
    last = after
    attempt = 0
    while True:
        try:
            if on_live is not None:
                on_live(last)
            tail = log.tail(session_id, last, until_ended=until_ended)
            async with closing_iter(tail) as envelopes:
                async for env in envelopes:
                    attempt = 0
                    if env.seq <= last:
                        continue  # defensive: never hand out a seq twice
                    last = env.seq
                    yield env
            return
        except RedisUnavailable as exc:
            attempt += 1
            delay = backoff(attempt, backoff_cap_s)
            if on_retry is not None:
                on_retry(FollowRetry(attempt, delay, last, str(exc)))
            await anyio.sleep(delay)
        except HistoryGone as exc:
            if on_gap is None or exc.first_available <= last + 1:
                raise
            on_gap(Gap(last, exc.first_available))
            last = exc.first_available - 1


class ClientEvent(Protocol):
    """One envelope as clients receive it: ``data`` is its client JSON (no server_data)."""

    @property
    def seq(self) -> int: ...

    @property
    def type(self) -> str: ...

    @property
    def data(self) -> bytes: ...


class EventSource(Protocol):
    """Where live transports get a session's events: batches in seq order (filtered by
    ``types``) after ``after``, or a :class:`Gap`; ends after ``session.ended``. Raises
    :class:`~eventcore.SessionNotFound` once the session's incarnation ``incarnation`` (by
    default the current one) is gone: a session created again under the id is another."""

    def follow(
        self, session_id: str, after: int, types: Collection[str] | None = None, *,
        incarnation: str | None = None,
    ) -> AsyncIterator[Sequence[ClientEvent] | Gap]: ...


@dataclass(frozen=True, slots=True)
class _Event:
    seq: int
    type: str
    data: bytes


class LogSource:
    """:class:`EventSource` over :func:`follow_log`: one blocking read per follower, which
    suits a few followers (tests, scripts); an API process passes :class:`HubSource`. It
    follows the session id and does not tell incarnations apart (``incarnation`` is
    ignored)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    async def follow(
        self, session_id: str, after: int, types: Collection[str] | None = None, *,
        incarnation: str | None = None,
    ) -> AsyncIterator[Sequence[ClientEvent] | Gap]:
        wanted = frozenset(types) if types else None
        async with closing_iter(follow_log(self.log, session_id, after)) as envelopes:
            async for env in envelopes:
                if wanted is None or env.type in wanted:
                    yield [_Event(env.seq, env.type, client_json(env))]


class HubSource:
    """:class:`EventSource` over the process's SSE hub (one shared live path for every
    follower). A Redis outage that outlasts the client's retries ends the hub subscription;
    this resubscribes from the last seq covered, so followers see neither gap nor repeat."""

    def __init__(self, hub: Hub, *, backoff_cap_s: float = 5.0) -> None:
        self.hub = hub
        self.backoff_cap_s = backoff_cap_s

    async def follow(
        self, session_id: str, after: int, types: Collection[str] | None = None, *,
        incarnation: str | None = None,
    ) -> AsyncIterator[Sequence[ClientEvent] | Gap]:
        from eventcore.server._hub import StreamReset

        cursor = after
        attempt = 0
        while True:
            try:
                async with self.hub.subscribe(session_id, cursor, types=types,
                                              incarnation=incarnation) as sub:
                    incarnation = sub.incarnation  # resubscribing: the same one, not the next
                    batches: AsyncIterator[Any] = sub.batches()
                    async with closing_iter(batches) as items:
                        async for item in items:
                            attempt = 0
                            if isinstance(item, StreamReset):
                                yield Gap(item.after, item.first_available)
                            else:
                                yield item
                            cursor = sub.cursor
                return
            except RedisUnavailable:
                attempt += 1
                await anyio.sleep(backoff(attempt, self.backoff_cap_s))
