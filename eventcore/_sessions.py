"""Session metadata as read from the ``meta`` hash."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from .errors import CorruptEntry

__all__ = ["INCARNATION_FIELDS", "SessionInfo", "SessionState", "current_incarnation",
           "session_info"]

INCARNATION_FIELDS = ("seq", "inc")
"""The metadata fields an ``HMGET`` reads to tell a session's current incarnation."""

SessionState = Literal["created", "active", "idle", "ended"]
_STATES = ("created", "active", "idle", "ended")


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


def _ts(raw: bytes | None) -> _dt.datetime | None:
    if not raw:
        return None
    return ms_datetime(int(raw))


def session_info(session_id: str, raw: Mapping[bytes, bytes]) -> SessionInfo:
    try:
        state = raw.get(b"state", b"").decode()
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        host = raw.get(b"host")
        return SessionInfo(
            session_id=session_id,
            state=state,  # type: ignore[arg-type]
            agent=raw.get(b"agent", b"").decode() or None,
            labels=msgspec.json.decode(raw.get(b"labels", b"{}"), type=dict[str, str]),
            last_seq=int(raw.get(b"seq", b"0")),
            epoch=int(raw.get(b"epoch", b"0")),
            host=host.decode() if host else None,
            created_at=_ts(raw.get(b"created_at")),
            updated_at=_ts(raw.get(b"updated_at")),
            ended_at=_ts(raw.get(b"ended_at")),
            ttl_s=int(raw.get(b"ttl", b"0")),
            incarnation=raw.get(b"inc", b"").decode(),
        )
    except (ValueError, msgspec.DecodeError) as exc:
        raise CorruptEntry(f"session {session_id!r} metadata is malformed: {exc}") from exc
