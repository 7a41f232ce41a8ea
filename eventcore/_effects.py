"""The effect ledger: run a function once per (session, key) and record what it returned."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec

from ._codec import decode_body
from ._envelope import EffectPayload, Envelope, ErrorInfo
from ._keys import MAX_KEY_BYTES, validate_key, validate_session_id
from ._redis import redis_errors, run_script
from ._scripts import lua
from .errors import (
    AppendNotReplicated,
    CorruptEntry,
    EffectFailed,
    SessionEnded,
    SessionNotFound,
    StaleHost,
    ValidationError,
)

if TYPE_CHECKING:
    from ._log import EventLog

__all__ = ["run_effect"]

T = TypeVar("T")
CLAIM_LUA = lua("eventcore", "effect_claim", with_layout=True)
# Delete the effect key's field only while it still holds this caller's claim.
RELEASE_LUA = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2])) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
_WAIT_MIN_S, _WAIT_MAX_S = 0.005, 0.25


def _outcome(record: Envelope, session_id: str, key: str) -> Any:
    p = msgspec.convert(record.payload, EffectPayload)
    if p.status == "ok":
        return p.result
    err = p.error or ErrorInfo(type="Error", message="unknown", retryable=False)
    raise EffectFailed(session_id, key, err.type, err.message, err.retryable)


def _event_key(key: str, attempt: int) -> str:
    """The record's event key: one per (key, attempt), within the 512-byte key limit."""
    ek = f"effect:{key}:{attempt}"
    if len(ek.encode()) <= MAX_KEY_BYTES:
        return ek
    return f"effect:sha256:{hashlib.sha256(key.encode()).hexdigest()}:{attempt}"


async def _release(log: EventLog, effects: str, key: str, token: str) -> None:
    """Hand the key back now rather than after the claim's TTL (best effort: the TTL is the
    fallback)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await run_script(log.redis.register_script(RELEASE_LUA), [effects],
                         [key, f"claim:{token}:"])


async def run_effect(
    log: EventLog,
    session_id: str,
    key: str,
    fn: Callable[[], Awaitable[T]],
    *,
    claim_ttl_s: float,
    epoch: int | None,
    run_id: str | None,
) -> Any:
    keys = log.keys.session(validate_session_id(session_id))
    validate_key(key, "effect key")
    script = log.redis.register_script(CLAIM_LUA)
    token = uuid.uuid4().hex
    wait = _WAIT_MIN_S
    while True:
        with redis_errors("effect claim"):
            (verdict, value), confirmed = await log.appender.replicated.run(
                script, [keys.effects, keys.meta],
                [key, token, int(claim_ttl_s * 1000), "" if epoch is None else epoch],
            )
        verdict = verdict.decode()
        if verdict == "run":
            try:
                # EVENTCORE_APPEND_REPLICAS: fn runs only under a replicated claim (a failover
                # that lost it would let another caller run fn too)
                log.appender.replicated.check(confirmed, what="effect claim")
            except AppendNotReplicated:
                await _release(log, keys.effects, key, token)
                raise
        if verdict == "done":
            (record,) = await log.hydrate([decode_body(value, where=keys.effects)])
            return _outcome(record, session_id, key)
        if verdict == "wait":
            # Another caller runs fn: poll with backoff until it records or its claim expires.
            await anyio.sleep(min(wait, int(value) / 1000))
            wait = min(wait * 2, _WAIT_MAX_S)
            continue
        if verdict == "missing":
            raise SessionNotFound(session_id)
        if verdict == "ended":
            raise SessionEnded(session_id)
        if verdict == "stale":
            raise StaleHost(session_id, epoch or 0, int(value))
        if verdict == "corrupt":
            raise CorruptEntry(f"effect {key!r} of session {session_id!r}: {value.decode()}")
        attempt = int(value)
        break

    try:
        result: Any = await fn()
        payload = EffectPayload(key=key, status="ok", result=result, attempt=attempt)
        failure: BaseException | None = None
    except BaseException as exc:
        if not isinstance(exc, Exception):
            # cancelled (or exiting): hand the key back now rather than after the claim's TTL
            await _release(log, keys.effects, key, token)
            raise
        payload = EffectPayload(
            key=key, status="failed", error=ErrorInfo.from_exception(exc), attempt=attempt
        )
        failure = exc
    env = Envelope(type="effect", session_id=session_id, run_id=run_id, payload=payload,
                   event_key=_event_key(key, attempt))
    try:
        prepared = log.appender.prepare(env, epoch, key)
    except ValidationError as exc:
        # fn ran but its result cannot be recorded: record that, terminally (running it again
        # would return the same unrecordable value)
        err = ErrorInfo(type="ValidationError", message=str(exc)[:2000], retryable=False)
        payload = EffectPayload(key=key, status="failed", error=err, attempt=attempt)
        failure = exc
        prepared = log.appender.prepare(msgspec.structs.replace(env, payload=payload), epoch, key)
    res = await log.appender.append(prepared)
    if res.duplicate:
        # Our claim expired and someone else recorded this attempt first: theirs stands.
        (record,) = await log.read(session_id, res.seq - 1, 1)
        return _outcome(record, session_id, key)
    if failure is not None:
        raise EffectFailed(session_id, key, payload.error.type if payload.error else "Error",
                           str(failure), bool(payload.error and payload.error.retryable)
                           ) from failure
    return msgspec.json.decode(msgspec.json.encode(result))
