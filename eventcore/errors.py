"""The exception tree. Every error eventcore raises derives from :class:`EventcoreError`.

    EventcoreError
    ├── ConfigError                 settings invalid at start
    │   └── MissingExtra            an optional part is used without its extra installed
    ├── ValidationError             hostile or malformed input (arguments, ids, keys, payloads)
    │   └── PayloadTooLarge
    ├── RedisError                  a Redis problem, converted at the boundary
    │   ├── RedisUnavailable        transient errors outlived the retry budget
    │   ├── CorruptEntry            a stream entry / key that is not what eventcore wrote
    │   └── AppendNotReplicated     EVENTCORE_APPEND_REPLICAS: fewer replicas confirmed in time
    ├── SessionError
    │   ├── SessionNotFound
    │   ├── SessionEnded
    │   └── StaleHost               fencing: this host's epoch was superseded
    ├── EffectFailed                an effect's recorded failure (terminal, or retried too soon)
    ├── HistoryGone                 asked for history that is gone from Redis and the archive
    │   └── HistoryDiverged         the stream's epoch changed past the cursor (failover)
    ├── SinkFailed                  published to the log, but an inline sink or hook failed
    ├── ScheduleNotFound            no schedule has this id (eventcore.schedules)
    ├── ScheduleConflict            a schedule id exists with another definition
    ├── Overloaded                  a configured capacity limit is reached; retry later
    ├── UsageError                  used outside its lifetime: not started, closed, already
    │                               running, ... (a programming error; also a RuntimeError)
    ├── ApplyConflict               subscribers: other consumers kept moving the same sessions
    ├── HubClosed                   subscribers: the SSE hub is shutting down
    ├── TailError                   ``eventcore tail``: a failure that retrying cannot fix
    ├── WorkerError                 the worker pool
    │   ├── RunTimedOut             a run exceeded its time limit (retryable)
    │   ├── TerminalError           raised by a handler: fail the session now, no retries
    │   ├── NoSuchAgent             no handler is registered for the session's agent
    │   └── WorkerFailed            the supervisor gave up after N consecutive failures
    └── EmbeddedRedisError          the embedded redis-server could not start
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AppendNotReplicated",
    "ApplyConflict",
    "ConfigError",
    "CorruptEntry",
    "EffectFailed",
    "EmbeddedRedisError",
    "EventcoreError",
    "HistoryDiverged",
    "HistoryGone",
    "HubClosed",
    "MissingExtra",
    "NoSuchAgent",
    "Overloaded",
    "PayloadTooLarge",
    "RedisError",
    "RedisUnavailable",
    "RunTimedOut",
    "ScheduleConflict",
    "ScheduleNotFound",
    "SessionEnded",
    "SessionError",
    "SessionNotFound",
    "SinkFailed",
    "StaleHost",
    "TailError",
    "TerminalError",
    "UsageError",
    "ValidationError",
    "WorkerError",
    "WorkerFailed",
]


class EventcoreError(Exception):
    """Base class of every error eventcore raises."""


class ConfigError(EventcoreError):
    """Settings are invalid; the message names the setting and what is wrong."""


class MissingExtra(ConfigError, ImportError):
    """An optional part of eventcore was used without the extra that installs its dependencies;
    the message names the extra (``pip install 'eventcore[server]'``). An ``ImportError`` too."""


class ValidationError(EventcoreError, ValueError):
    """An argument, id, key or payload was rejected at the edge. Nothing was written. A
    ``ValueError`` too, which is what argument checks raise by convention."""


class PayloadTooLarge(ValidationError):
    """A payload exceeds the configured maximum (even as a blob reference)."""


class RedisError(EventcoreError):
    """A Redis failure, converted from redis-py at the boundary (see ``__cause__``)."""


class RedisUnavailable(RedisError):
    """Redis stayed unreachable (or loading) for longer than the retry budget."""


class CorruptEntry(RedisError):
    """A key or stream entry does not hold what eventcore writes there."""


class AppendNotReplicated(RedisError):
    """``EVENTCORE_APPEND_REPLICAS=N``: the shard's master had the append, but fewer than N
    replicas confirmed it within the timeout (``WAIT`` answered ``replicas``). The append is
    **not acknowledged**: it may be in the log (and survive) or be lost by a failover. Retrying
    with the same event key is safe: the log keeps the first copy, and a retry that finds it
    answers ``duplicate`` once it is replicated. ``results`` are the appends of the batch as the
    master answered them. The same error reports the other writes held to the rule (``what``):
    a worker's claim (its ``session.started``), a schedule's firing, a deletion, an effect's
    claim."""

    def __init__(self, wanted: int, replicas: int, timeout_ms: int,
                 results: Sequence[Any] = (), *, what: str = "append") -> None:
        self.wanted = wanted
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.results = list(results)
        #: the operation: ``append``, or another write held to the same rule (``claim``,
        #: ``schedule fire``, ``delete``, ``effect claim``)
        self.what = what
        retry = ("retry with the same event key" if what == "append"
                 else "it is safe to try again")
        super().__init__(
            f"{what} not acknowledged: {replicas} of {wanted} replicas confirmed it within "
            f"{timeout_ms} ms (EVENTCORE_APPEND_REPLICAS); it may or may not be in the log: "
            f"{retry}")


class SessionError(EventcoreError):
    def __init__(self, session_id: str, message: str | None = None) -> None:
        self.session_id = session_id
        super().__init__(message or f"{type(self).__name__}: session {session_id!r}")


class SessionNotFound(SessionError):
    """The session does not exist (never created, deleted or expired)."""


class SessionEnded(SessionError):
    """The session has ended; it accepts no more events."""


class StaleHost(SessionError):
    """The append carried a host epoch older than the session's: another host owns it now."""

    def __init__(self, session_id: str, epoch: int, current: int) -> None:
        self.epoch = epoch
        self.current = current
        super().__init__(
            session_id,
            f"session {session_id!r} is hosted at epoch {current}; this host has epoch {epoch}",
        )


class EffectFailed(EventcoreError):
    """An effect's function failed; the failure is recorded in the ledger."""

    def __init__(
        self, session_id: str, key: str, error_type: str, message: str, retryable: bool
    ) -> None:
        self.session_id = session_id
        self.key = key
        self.error_type = error_type
        self.retryable = retryable
        super().__init__(
            f"effect {key!r} of session {session_id!r} failed "
            f"({'retryable' if retryable else 'terminal'}): {error_type}: {message}"
        )


class HistoryGone(EventcoreError):
    """History after ``after`` was trimmed from Redis and is not in any archive; what remains
    starts at ``first_available``.

    The one "reset" of the project: :meth:`EventLog.read` raises it, and a follower
    (:class:`eventcore._follow.Follower`) yields it as an item of its stream, then goes on
    after :attr:`resume_after` (SSE sends it as ``stream.reset``, WebRTC as ``gap``)."""

    def __init__(self, session_id: str, after: int, first_available: int) -> None:
        self.session_id = session_id
        self.after = after
        self.first_available = first_available
        super().__init__(
            f"session {session_id!r}: events after seq {after} are gone; "
            f"the oldest available is seq {first_available}"
        )

    @property
    def resume_after(self) -> int:
        """The cursor to go on from: everything up to it is gone."""
        return self.first_available - 1


class HistoryDiverged(HistoryGone):
    """The history a reader followed may have been rewritten: its cursor is on another epoch
    than the stream's now (a failover promoted a replica that lacked the last appends, detected
    by a writer or by this reader), or beyond the stream's tail. What the reader holds after
    :attr:`resume_after` must be discarded; the stream goes on from there on ``epoch``.

    A follower yields it as an item (SSE: ``stream.reset`` with ``reason: "diverged"``), then
    follows the new epoch from :attr:`resume_after`."""

    def __init__(self, session_id: str, after: int, resume_after: int, epoch: str,
                 seen_epoch: str = "") -> None:
        self.epoch = epoch
        self.seen_epoch = seen_epoch
        HistoryGone.__init__(self, session_id, after, resume_after + 1)
        self.args = (
            f"session {session_id!r}: the history after seq {resume_after} may have diverged "
            f"from what was read up to seq {after} (epoch {seen_epoch or '0'} -> "
            f"{epoch or '0'}): discard it and resume after {resume_after}",)


class Overloaded(EventcoreError):
    """A configured capacity limit (peers, clients, ...) is reached; retrying later may work."""


class SinkFailed(EventcoreError):
    """The envelopes are in the log (``published``), but the ``on_published`` hook or an inline
    sink failed or timed out (``__cause__``). Publishing the same envelopes again is safe: their
    event keys make the log keep the first, and the hook and sinks run again."""

    def __init__(self, stage: str, published: Sequence[Any], cause: BaseException) -> None:
        self.stage = stage
        self.published = list(published)
        super().__init__(
            f"{stage} failed after {len(self.published)} envelope(s) were published: "
            f"{type(cause).__name__}: {cause}"
        )


class UsageError(EventcoreError, RuntimeError):
    """An object was used outside its lifetime or in a way it does not support (not started,
    closed, already running, ...): a programming error, not worth retrying. A ``RuntimeError``
    too, as these checks raised that before."""


class ApplyConflict(EventcoreError):
    """Another consumer kept moving the same sessions; the entries are retried later."""


class HubClosed(EventcoreError):
    """The hub is shutting down; resume elsewhere (or later) from your last seq."""


class TailError(EventcoreError):
    """A failure that retrying cannot fix (unknown session, bad credentials, ...)."""


class WorkerError(EventcoreError):
    """Raised by the worker pool (``workers``)."""


class RunTimedOut(WorkerError):
    """A run exceeded its time limit; recorded as ``run.timed_out``. Retryable."""

    retryable = True


class TerminalError(WorkerError):
    """Raise from a handler to fail the session at once: no retries, straight to dead-letter."""

    retryable = False


class NoSuchAgent(WorkerError):
    """The session names an agent this worker's app does not register. Terminal."""

    retryable = False


class WorkerFailed(WorkerError):
    """The worker's supervisor gave up after too many consecutive failures."""


class EmbeddedRedisError(EventcoreError):
    """The embedded redis-server could not be found or started."""


class ScheduleNotFound(EventcoreError, LookupError):
    """No schedule has this id (:mod:`eventcore.schedules`)."""

    def __init__(self, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(f"schedule {schedule_id!r} does not exist")


class ScheduleConflict(EventcoreError):
    """A schedule with this id exists with another definition (creating the same one again is
    idempotent), or it kept changing while being updated."""
