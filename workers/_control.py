"""Controlling sessions from outside a worker: cancel them, read the dead letters."""

from __future__ import annotations

from typing import Any

import msgspec

from eventcore import AppendResult, Envelope, ErrorInfo, EventLog
from eventcore._codec import decode_dead_letter
from eventcore._layout import CONTROL_CANCEL, DEAD_KIND_SESSION, META_DISPATCHED
from eventcore._redis import redis_errors

__all__ = ["DeadLetter", "cancel", "dead_letters"]


async def cancel(
    log: EventLog,
    session_id: str,
    *,
    run_id: str | None = None,
    reason: str = "cancelled",
    idempotency_key: str | None = None,
) -> AppendResult:
    """Request cancellation of one run (``run_id``) or of the whole session: appends a
    ``control.cancel`` event. The host cancels the run (``run.cancelled``, the handler goes on)
    or the handler (``run.cancelled`` for the current run, then ``session.ended`` with reason
    ``cancelled``). A session nobody hosts and nothing will host (idle) is ended here."""
    payload: dict[str, Any] = {"reason": reason}
    if run_id is not None:
        payload["run_id"] = run_id
    res = await log.append(Envelope(
        type=CONTROL_CANCEL, session_id=session_id, payload=payload,
        event_key=f"{CONTROL_CANCEL}:{idempotency_key}" if idempotency_key else ""))
    if run_id is None:
        info = await log.get_session(session_id)
        redis: Any = log.redis  # redis-py's command stubs mix sync and async return types
        with redis_errors("cancel"):
            raw = await redis.hget(log.keys.session(session_id).meta, META_DISPATCHED)
        if info.state in ("idle", "created") and raw is None:
            # No host and no dispatch outstanding: nobody else will see the request. A host
            # that appears meanwhile sees it in the history and records the same end (the
            # "session.ended" event key makes the two one).
            await log.end_session(session_id, "cancelled")
    return res


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A session that failed for good, as recorded in its shard's dead-letter stream."""

    entry_id: str
    session_id: str
    agent: str
    attempts: int
    error: ErrorInfo
    worker: str
    at_ms: int


async def dead_letters(log: EventLog, *, count: int = 1000) -> list[DeadLetter]:
    """Dead-lettered sessions of every shard (the oldest ``count`` per shard)."""
    out: list[DeadLetter] = []
    for shard in log.keys.all_shards():
        with redis_errors("dead letters"):
            entries = await log.redis.xrange(log.keys.dead(shard), count=count)
        for eid, f in entries:
            rec = decode_dead_letter(eid, f)
            if rec is None or rec.kind != DEAD_KIND_SESSION:
                continue  # a subscriber's record (the dead stream is shared with subscribers)
            out.append(DeadLetter(
                entry_id=rec.entry_id, session_id=rec.session_id, agent=rec.agent,
                attempts=rec.attempts, error=rec.error, worker=rec.worker, at_ms=rec.at_ms))
    return out
