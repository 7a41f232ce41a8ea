"""The sink plug point: a small protocol and the value object every sink receives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from eventcore import Envelope

__all__ = ["Published", "Sink"]


@dataclass(frozen=True, slots=True)
class Published:
    """An envelope that is in the log: its stream name (``session/<id>``) and its seq.

    ``duplicate`` is true when the publish was a retry of an event key already in the log; the
    envelope is then the one the caller sent, and ``seq`` the seq the log kept for it.
    """

    envelope: Envelope
    stream: str
    seq: int
    duplicate: bool = False

    @property
    def session_id(self) -> str:
        return self.envelope.session_id

    @property
    def type(self) -> str:
        return self.envelope.type

    @classmethod
    def of(cls, envelope: Envelope, *, duplicate: bool = False) -> Published:
        """Wrap an envelope read from the log (its ``seq`` is already set)."""
        return cls(envelope, envelope.stream, envelope.seq, duplicate)


@runtime_checkable
class Sink(Protocol):
    """Where published envelopes go. ``send`` gets them in seq order per session.

    A sink runs either inline (``Publisher``: after the log accepted the envelopes, on the
    caller's path, so a failure reaches the caller) or as a subscriber (``SinkSubscriber``: off
    the hot path, at least once, retried with backoff, poison to the dead-letter stream). Either
    way a sink may see an envelope more than once; ``(session_id, seq)`` identifies it.
    """

    async def send(self, envelopes: Sequence[Published]) -> None: ...

    async def aclose(self) -> None: ...
