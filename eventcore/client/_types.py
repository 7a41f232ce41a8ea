"""What the client returns: typed answers of the /v1 API and the non-envelope stream frames."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal

import msgspec

from eventcore._envelope import Envelope
from eventcore.errors import HistoryDiverged, HistoryGone

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
    """One JSON page of history; page on with ``after=next_after, epoch=epoch`` until
    ``events`` is empty and ``reset`` is ``None``.

    ``epoch`` is the stream epoch of ``next_after`` (``"0"`` until the session's history first
    diverged). ``reset`` is set when the history after the cursor asked for may have been
    rewritten (a failover lost acknowledged appends) or the cursor was beyond the tail: the
    page then has no events, and what the reader holds after ``reset.resume_after``
    (``== next_after``) must be discarded before paging on."""

    events: list[Envelope]
    next_after: int
    epoch: str = "0"
    reset: HistoryDiverged | None = None


class _WirePage(msgspec.Struct, frozen=True, kw_only=True):
    """``GET .../events?format=json`` as sent (``reset``: the SSE ``stream.reset`` data)."""

    events: list[Envelope]
    next_after: int
    epoch: str = "0"
    reset: dict[str, Any] | None = None


class SessionDeleted(msgspec.Struct, frozen=True, kw_only=True):
    """The stream's last item when the session was deleted (or its keys expired) before the
    stream reached ``session.ended``. Not resumable: the id may name another session now."""

    session_id: str
    last_seq: int
    incarnation: str = ""


StreamItem = Envelope | HistoryGone | SessionDeleted
"""What :meth:`AsyncClient.events` yields: every envelope (all types, built-in and custom);
:class:`~eventcore.errors.HistoryDiverged` (a :class:`~eventcore.errors.HistoryGone`) where the
history after the cursor may have been rewritten (``stream.reset`` with ``reason:
"diverged"``: discard what you hold after its ``resume_after``; the stream goes on from there
in its ``epoch``); :class:`~eventcore.errors.HistoryGone` where history after the cursor is
gone everywhere (``stream.reset``; the stream goes on after ``resume_after``); and
:class:`SessionDeleted` as the last item of a deleted session."""


def diverged(session_id: str, data: dict[str, Any]) -> HistoryDiverged:
    """The reset a ``stream.reset`` with ``reason: "diverged"`` (or a JSON page's ``reset``)
    says, as the core's type."""
    return HistoryDiverged(session_id, int(data["after"]), int(data["resume_after"]),
                           str(data.get("epoch") or "0"),
                           seen_epoch=str(data.get("seen_epoch") or "0"))


def page_of(session_id: str, wire: _WirePage) -> EventsPage:
    return EventsPage(events=wire.events, next_after=wire.next_after, epoch=wire.epoch or "0",
                      reset=diverged(session_id, wire.reset) if wire.reset else None)
