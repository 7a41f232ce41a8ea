"""Running one hosted session's handler and settling how it ended.

Outcomes and what is recorded:

==========  ==================================================================================
completed   the handler returned: ``session.ended`` (completed), entry acknowledged
ended       the session was ended from outside (``session.ended`` in its stream): acknowledged
cancel      a ``control.cancel`` for the session: ``session.ended`` (cancelled), acknowledged
timeout     the session timeout passed: ``session.ended`` (timed_out), acknowledged
failed      the handler raised: retried through the delayed set, or after the last attempt (or
            a terminal error) dead-lettered and ``session.ended`` (failed, with the error)
unload      idle: already released by the unload script; nothing recorded
handback    drain: already re-dispatched by the handback script; nothing recorded
lost        another host took over (fencing): this worker writes nothing more
==========  ==================================================================================
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import anyio
import msgspec

from eventcore import ErrorInfo
from eventcore._append import HostingAck
from eventcore._codec import encode
from eventcore._layout import SESSION_CHECKPOINT, SESSION_STARTED
from eventcore.errors import HistoryGone, SessionEnded, StaleHost

from ._scripts import GROUP
from ._session import Session

if TYPE_CHECKING:
    from ._worker import Worker

__all__ = ["settle"]

log = logging.getLogger("workers")
_QUIET = ("lost", "handback", "unload")
async def settle(w: Worker, s: Session, dead: bool, error: str, *, fresh: bool = False,
                 started: bool = False) -> None:
    """``started``: the claim recorded (or found) ``session.started`` already."""
    if s.checkpoint_seq and not dead:
        await _restore(w, s)
    if not fresh:  # (a fresh session's history is known: only session.created)
        w.feed.mark(s)  # read the session's history: its inputs and control events
    if dead:
        # a previous host dead-lettered the session but died before recording its end
        info = _decode_error(error)
        with _settling(w):
            await _end_and_ack(w, s, "failed", info)
        return
    result: tuple[str, Exception | None] | None = None
    with anyio.CancelScope(deadline=s._deadline) as scope:
        s._scope = scope
        if s._stop_reason is not None:
            scope.cancel()
        result = await _run(s, started)
        if not scope.cancel_called:
            # the common end (the handler returned or raised): this scope becomes the one
            # settling it, shielded and given a lease TTL (one scope per session less). The
            # session no longer cancels it: a stop from now on changes nothing it records
            s._scope = None
            scope.shield = True
            scope.deadline = asyncio.get_running_loop().time() + w.lease_ttl_s
            outcome, exc = _outcome(s, result)
            await _finish(w, s, outcome, exc)
            return
    # the host cancelled the handler (a stop, the session timeout): settled in a scope of its
    # own
    outcome, exc = _outcome(s, result)
    with _settling(w):
        await _finish(w, s, outcome, exc)


def _settling(w: Worker) -> anyio.CancelScope:
    """Recording how a session ended: shielded from the worker's cancellation, given up
    after a lease TTL (one scope: a shielded scope's own deadline still applies). The
    worker runs on asyncio, whose loop clock is anyio's (and cheaper to ask directly)."""
    return anyio.CancelScope(shield=True,
                             deadline=asyncio.get_running_loop().time() + w.lease_ttl_s)


async def _restore(w: Worker, s: Session) -> None:
    """Start from the handler's last checkpoint: its state, and the history read from the
    last input it covers (through the archive if Redis has trimmed it)."""
    try:
        page = await w.log.read(s.id, s.checkpoint_seq - 1, 1)
    except HistoryGone:
        page = []
    if not page or page[0].seq != s.checkpoint_seq or page[0].type != SESSION_CHECKPOINT:
        log.warning("session %s: checkpoint at seq %d not found; replaying from the start",
                    s.id, s.checkpoint_seq)
        return
    s._restore(page[0])


async def _run(s: Session, started: bool) -> tuple[str, Exception | None]:
    """The handler, inside the session's cancel scope (:func:`settle`'s): how it ended, unless
    that scope cancelled it."""
    try:
        if not started:
            await s._append(SESSION_STARTED, {"agent": s.agent}, SESSION_STARTED)
        await s.spec.handler(s)
        return ("completed", None)
    except StaleHost:
        return ("lost", None)
    except SessionEnded:
        return ("ended", None)
    except Exception as exc:
        return ("failed", exc)


def _outcome(s: Session, result: tuple[str, Exception | None] | None
             ) -> tuple[str, Exception | None]:
    """What to record: the handler's result (None: the host cancelled it), as the host's
    reason to stop it (if any) overrides."""
    reason = s.stop_reason
    if reason in _QUIET:
        return reason, None
    if result is None:  # the host cancelled the handler
        return reason or "lost", None
    if result[0] == "failed" and reason in ("cancel", "timeout", "ended"):
        return reason, None
    return result


async def _finish(w: Worker, s: Session, outcome: str, exc: Exception | None) -> None:
    m = w.metrics
    if outcome == "completed":
        if await _end_and_ack(w, s, "completed", None):
            m.completed += 1
    elif outcome == "ended":
        await _ack(w, s)
    elif outcome == "cancel":
        if await _end_and_ack(w, s, "cancelled", None):
            m.cancelled += 1
    elif outcome == "timeout":
        info = ErrorInfo(type="SessionTimedOut", message="the session exceeded its timeout",
                         retryable=False)
        if await _end_and_ack(w, s, "timed_out", info):
            m.timed_out += 1
    elif outcome == "failed":
        assert exc is not None
        await _failed(w, s, exc)


async def _failed(w: Worker, s: Session, exc: Exception) -> None:
    policy = s.spec.retry or w.retry
    info = ErrorInfo.from_exception(exc)
    if not info.message:
        info = ErrorInfo(type=info.type, message=repr(exc)[:2000], retryable=info.retryable)
    if info.retryable and s.attempt < policy.max_attempts:
        delay = policy.delay_s(s.attempt)
        log.warning("session %s attempt %d failed (%s: %s); retrying in %.2f s", s.id,
                    s.attempt, info.type, info.message, delay, exc_info=exc)
        due = int((time.time() + delay) * 1000)
        if await w.release_retry(s, due_ms=due, attempt=s.attempt + 1) == "ok":
            w.metrics.retries += 1
        else:
            w.fenced(s)
        return
    log.error("session %s failed for good after %d attempt(s): %s: %s", s.id, s.attempt,
              info.type, info.message, exc_info=exc)
    if await w.release_dead(s, error_json=encode(info).decode()) != "ok":
        w.fenced(s)
        return
    if await _end_and_ack(w, s, "failed", info):
        w.metrics.dead_lettered += 1


async def _end_and_ack(w: Worker, s: Session, reason: str, error: ErrorInfo | None) -> bool:
    """Record the session's end and release the hosting, in one step when the end is new."""
    with w.releasing(s) as released:
        recorded = await _end(w, s, reason, error, HostingAck(GROUP, s.entry_id, w.id))
        if recorded is None:
            return False
        released(recorded)
    return recorded or await _ack(w, s)


async def _end(w: Worker, s: Session, reason: str, error: ErrorInfo | None,
               ack: HostingAck) -> bool | None:
    """None: fenced. True: recorded now, and the hosting released. False: recorded earlier,
    or ended from outside meanwhile (nothing added, nothing released)."""
    s.inflight += 1  # an own append: not read back (see Session.defer_read)
    seq = None
    try:
        res = await w.log.end_session(s.id, reason, error=error, epoch=s.epoch, ack=ack)
        seq = res.seq
        return not res.duplicate
    except StaleHost:
        w.fenced(s)
        return None
    except SessionEnded:
        return False
    finally:
        s._landed(seq)


async def _ack(w: Worker, s: Session) -> bool:
    if await w.release_ack(s) == "ok":
        return True
    w.fenced(s)
    return False


def _decode_error(raw: str) -> ErrorInfo:
    try:
        return msgspec.json.decode(raw or "{}", type=ErrorInfo)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ErrorInfo(type="Error", message=raw[:2000] or "unknown", retryable=False)
