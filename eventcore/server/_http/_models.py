"""Request and response bodies of the /v1 API (pydantic: validated at the edge, documented in
the OpenAPI schema). Envelopes are sent as the log stores them and documented by
:class:`EnvelopeModel`."""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from eventcore._values import validate_value

__all__ = [
    "CancelIn",
    "CreateSessionIn",
    "CreateSessionOut",
    "DeadLetterOut",
    "DeadLettersOut",
    "EnvelopeModel",
    "EventsPage",
    "InputIn",
    "SeqOut",
    "SessionListOut",
    "SessionOut",
    "SessionSummary",
    "SignalIn",
    "SignalsOut",
    "TokenIn",
    "TokenOut",
]

Key = Annotated[str, Field(min_length=1, max_length=500)]
Value = Annotated[Any, AfterValidator(validate_value)]
"""Any JSON value every reader can take back (``eventcore._values``): else 422."""
_STRICT = ConfigDict(extra="forbid", strict=True)


class CreateSessionIn(BaseModel):
    model_config = _STRICT

    agent: Key
    input: Value = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=128)],
                             Annotated[str, Field(max_length=1024)]] | None,
                        AfterValidator(validate_value)] = Field(
        default=None, max_length=64, description="String labels stored with the session.")
    ttl_s: int | None = Field(default=None, ge=0, le=365 * 24 * 3600,
                              description="Seconds the session is kept after it ends.")
    idempotency_key: Key | None = Field(
        default=None, description="Creating again with the same key returns the same session.")


_INCARNATION = Field(description="Tells apart sessions created under the same id (after a "
                     "delete): 16 digits, increasing; tokens open one incarnation only.")


class CreateSessionOut(BaseModel):
    session_id: str
    stream: str
    incarnation: str = _INCARNATION
    token: str


class InputIn(BaseModel):
    model_config = _STRICT

    payload: Value = Field(description="Any JSON value (nested at most 64 deep, finite "
                           "numbers, integers within +-(2**53 - 1), valid Unicode).")
    idempotency_key: Key | None = Field(
        default=None, description="Repeating a key returns the first input's seq and appends "
        "nothing.")


class SignalIn(BaseModel):
    model_config = _STRICT

    key: Key
    value: Value = None


class CancelIn(BaseModel):
    model_config = _STRICT

    run_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    reason: Annotated[str, Field(max_length=500)] | None = None


class TokenIn(BaseModel):
    model_config = _STRICT

    scope: Literal["read", "rw"] = "read"
    ttl_s: int = Field(default=300, ge=1, le=24 * 3600)


class TokenOut(BaseModel):
    token: str
    scope: Literal["read", "rw"]
    expires_in: int


class SeqOut(BaseModel):
    seq: int
    duplicate: bool = False


class EnvelopeModel(BaseModel):
    """An envelope as clients see it (``server_data`` is never included)."""

    model_config = ConfigDict(extra="allow")

    seq: int
    type: str
    session_id: str
    run_id: str | None = None
    event_key: str | None = None
    ts: _dt.datetime
    payload: Any = None
    payload_ref: str | None = None
    trace: str | None = None
    v: int | None = None


class EventsPage(BaseModel):
    events: list[EnvelopeModel]
    next_after: int


class SignalsOut(BaseModel):
    signals: list[EnvelopeModel]


class SessionOut(BaseModel):
    session_id: str
    stream: str
    incarnation: str = _INCARNATION
    state: Literal["created", "active", "idle", "ended"]
    agent: str | None
    labels: dict[str, str]
    last_seq: int
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    ended_at: _dt.datetime | None
    projection: dict[str, Any] | None = Field(
        description="The projector's read model of the session, once it has one.")
    host: str | None = Field(default=None, description="The worker hosting the session now "
                             "(API key callers only; null for session tokens).")
    ttl_s: int | None = Field(default=None, description="Seconds the session is kept after it "
                              "ends (0: forever); API key callers only.")


class SessionSummary(BaseModel):
    """One session of a listing: its metadata (no projection)."""

    session_id: str
    stream: str
    incarnation: str = _INCARNATION
    state: Literal["created", "active", "idle", "ended"]
    agent: str | None
    labels: dict[str, str]
    last_seq: int
    host: str | None = Field(description="The worker hosting the session now, if any.")
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    ended_at: _dt.datetime | None
    ttl_s: int


class SessionListOut(BaseModel):
    """A page of sessions, newest first. Pass ``next_cursor`` back as ``cursor`` (with the same
    filters) for the next page; ``null``: there is no more. A filtered page may hold fewer than
    ``limit`` sessions and still have a ``next_cursor``."""

    sessions: list[SessionSummary]
    next_cursor: str | None



class DeadLetterOut(BaseModel):
    """A session a worker gave up on (its handler kept failing, or its hosts kept dying)."""

    entry_id: str
    session_id: str
    agent: str
    attempts: int
    error: dict[str, Any] = Field(description="{type, message, retryable}")
    worker: str
    at: _dt.datetime | None


class DeadLettersOut(BaseModel):
    dead_letters: list[DeadLetterOut]
