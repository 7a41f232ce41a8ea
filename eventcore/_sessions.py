"""Session metadata as read from the ``meta`` hash (by :func:`eventcore._codec.session_info`)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Literal

import msgspec

from . import _layout as L

__all__ = ["INCARNATION_FIELDS", "LISTING_FIELDS", "ListingFields", "SessionInfo", "SessionState",
           "current_incarnation", "listing_fields"]

INCARNATION_FIELDS = (L.META_SEQ, L.META_INCARNATION)
"""The metadata fields an ``HMGET`` reads to tell a session's current incarnation."""

SessionState = Literal["created", "active", "idle", "ended"]


class SessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A session's metadata. ``incarnation`` tells apart sessions created under the same id
    (one deleted, or expired, then created again): 16 digits, increasing, ``""`` for a session
    created before incarnations existed."""

    session_id: str
    state: SessionState
    agent: str | None
    labels: dict[str, str]
    last_seq: int
    epoch: int
    host: str | None
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    ended_at: _dt.datetime | None
    ttl_s: int
    incarnation: str = ""

    @property
    def stream(self) -> str:
        return f"session/{self.session_id}"


def current_incarnation(fields: Sequence[bytes | None]) -> str | None:
    """The incarnation ``HMGET meta seq inc`` names: None where there is no such session."""
    seq, inc = fields
    return None if seq is None else (inc or b"").decode()


def ms_datetime(ms: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC)


LISTING_FIELDS = (L.META_INCARNATION, L.META_STATE, L.META_AGENT, L.META_LABELS,
                  L.META_CREATED_AT)
"""The metadata fields a listing's filters look at (``HMGET``), before a match is read whole."""


class ListingFields(msgspec.Struct, frozen=True):
    incarnation: str
    state: str
    agent: str | None
    labels: dict[str, str] | None  # None: not decoded (no label filter asked for it)
    created_ms: int | None


def listing_fields(raw: Sequence[bytes | None], *, labels: bool) -> ListingFields | None:
    """The fields :data:`LISTING_FIELDS` read; None where there is no such session, or its
    metadata is unreadable."""
    inc, state, agent, raw_labels, created = raw
    if state is None:
        return None
    try:
        return ListingFields(
            incarnation=(inc or b"").decode(), state=state.decode(),
            agent=agent.decode() or None if agent is not None else None,
            labels=msgspec.json.decode(raw_labels or b"{}", type=dict[str, str])
            if labels else None,
            created_ms=int(created) if created else None)
    except (ValueError, msgspec.DecodeError):
        return None
