"""The envelope: one thing that happened in a session, and typed payloads for built-in kinds."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Final, Literal

import msgspec

__all__ = [
    "SCHEMA_VERSION",
    "EffectPayload",
    "Envelope",
    "ErrorInfo",
    "RunPayload",
    "SessionCheckpointPayload",
    "SessionCreatedPayload",
    "SessionEndedPayload",
    "SignalPayload",
    "SignalSummary",
    "ToolPayload",
    "decode_payload",
    "utcnow",
]

SCHEMA_VERSION: Final = 1


_now = _dt.datetime.now
_UTC = _dt.UTC


def utcnow() -> _dt.datetime:
    return _now(_UTC)  # bound once: every envelope calls this (its ts default)


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An event in a session's log.

    ``seq`` is 0 until the log assigns it at append. ``server_data`` is stored and handed to
    server-side consumers but never serialized for clients (see :func:`client_json`).
    ``payload_ref`` is set (and ``payload`` hydrated on read) when the payload was stored as a
    content-addressed blob because it exceeded the inline limit.
    """

    seq: int = 0
    type: str
    session_id: str
    run_id: str | None = None
    event_key: str = ""
    ts: _dt.datetime = msgspec.field(default_factory=utcnow)
    payload: Any = None
    payload_ref: str | None = None
    server_data: Any = None
    trace: str | None = None
    v: int = SCHEMA_VERSION

    @property
    def stream(self) -> str:
        """The logical stream name clients subscribe to."""
        return f"session/{self.session_id}"


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A structured error: what failed, and whether trying again may help."""

    type: str
    message: str
    retryable: bool = True

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        retryable = getattr(exc, "retryable", True)
        return cls(type=type(exc).__name__, message=str(exc)[:2000], retryable=bool(retryable))


class SessionCreatedPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    agent: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    input: Any = None


class SessionEndedPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    reason: str = "completed"
    error: ErrorInfo | None = None


class SessionCheckpointPayload(msgspec.Struct, frozen=True, kw_only=True):
    """A handler's checkpoint: every input up to seq ``after`` is accounted for in the state
    it saved (kept in the envelope's ``server_data``, never sent to clients)."""

    after: int


class SignalSummary(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Stands in for a large or sensitive signal value."""

    size: int
    sha256: str
    content_type: str
    sample: str


class SignalPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    key: str
    value: Any = None
    summary: SignalSummary | None = None


class EffectPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    key: str
    status: Literal["ok", "failed"]
    result: Any = None
    error: ErrorInfo | None = None
    attempt: int = 1


class ToolPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    tool: str
    call_id: str
    args: Any = None
    result: Any = None
    error: ErrorInfo | None = None
    duration_ms: float | None = None


class RunPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    error: ErrorInfo | None = None
    duration_ms: float | None = None


_TYPED: dict[str, type[msgspec.Struct]] = {
    "session.created": SessionCreatedPayload,
    "session.ended": SessionEndedPayload,
    "session.checkpoint": SessionCheckpointPayload,
    "signal": SignalPayload,
    "effect": EffectPayload,
    "tool.started": ToolPayload,
    "tool.ended": ToolPayload,
    "run.started": RunPayload,
    "run.completed": RunPayload,
    "run.failed": RunPayload,
    "run.cancelled": RunPayload,
    "run.timed_out": RunPayload,
}


def decode_payload(envelope: Envelope) -> Any:
    """The payload as its typed Struct for built-in kinds; other kinds pass through as-is."""
    kind = _TYPED.get(envelope.type)
    if kind is None or isinstance(envelope.payload, kind):
        return envelope.payload
    return msgspec.convert(envelope.payload, kind)
