"""What the client returns: typed answers of the /v1 API and the non-envelope stream frames."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal

import msgspec

from eventcore._envelope import Envelope
from eventcore.errors import HistoryGone

__all__ = ["Appended", "CreatedSession", "EventsPage", "SessionDeleted", "SessionState",
           "StreamItem", "Token"]


class CreatedSession(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /v1/sessions``: the new session and a read-write token of it."""

    session_id: str
    stream: str
    incarnation: str
    token: str


class SessionState(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/sessions/{id}``."""

    session_id: str
    stream: str
    incarnation: str
    state: Literal["created", "active", "idle", "ended"]
    agent: str | None
    labels: dict[str, str]
    last_seq: int
    created_at: _dt.datetime | None = None
    updated_at: _dt.datetime | None = None
    ended_at: _dt.datetime | None = None
    projection: dict[str, Any] | None = None


class Appended(msgspec.Struct, frozen=True, kw_only=True):
    """An input, signal or cancel request appended: its ``seq``; ``duplicate`` when the
    idempotency key had been used (``seq`` is then the first one's)."""

    seq: int
    duplicate: bool = False


class Token(msgspec.Struct, frozen=True, kw_only=True):
    """A minted session token."""

    token: str
    scope: Literal["read", "rw"]
    expires_in: int


class EventsPage(msgspec.Struct, frozen=True, kw_only=True):
    """One JSON page of history; page on with ``after=next_after`` until ``events`` is
    empty."""

    events: list[Envelope]
    next_after: int


class SessionDeleted(msgspec.Struct, frozen=True, kw_only=True):
    """The stream's last item when the session was deleted (or its keys expired) before the
    stream reached ``session.ended``. Not resumable: the id may name another session now."""

    session_id: str
    last_seq: int
    incarnation: str = ""


StreamItem = Envelope | HistoryGone | SessionDeleted
"""What :meth:`AsyncClient.events` yields: every envelope (all types, built-in and custom);
:class:`~eventcore.errors.HistoryGone` where history after the cursor is gone everywhere
(``stream.reset``; the stream goes on after ``resume_after``); and :class:`SessionDeleted` as
the last item of a deleted session."""
