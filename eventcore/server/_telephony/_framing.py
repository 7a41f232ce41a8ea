"""What every provider's media-stream framing maps to and from: the call's start, inbound
events (audio frames, DTMF, played marks, stop) and outbound effects (audio, marks, clear).

A provider module (``_twilio``, ``_telnyx``, ``_plivo``, ``_exotel``) is one :class:`Framing`,
built on :class:`MediaStream` (the shape they share):
how to recognise its handshake, read its messages and write the messages it accepts.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["CallStart", "Dtmf", "Framing", "Inbound", "MarkPlayed", "Media", "MediaStream",
           "Stop", "b64", "get_path", "number", "text"]


@dataclass(frozen=True, slots=True)
class CallStart:
    """A provider's ``start``: who is calling, on which stream, in which audio format."""

    provider: str
    call_id: str
    stream_id: str
    account_id: str = ""
    encoding: str = "audio/x-mulaw"
    sample_rate: int = 8000
    custom: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_second(self) -> int:
        linear = any(k in self.encoding.lower() for k in ("l16", "raw", "pcm", "linear"))
        return self.sample_rate * (2 if linear else 1)

    def server_data(self) -> dict[str, Any]:
        """The provider's ids, for ``server_data`` (never shown to clients)."""
        return {"telephony": {"provider": self.provider, "call_id": self.call_id,
                              "stream_id": self.stream_id, "account_id": self.account_id}}


@dataclass(frozen=True, slots=True)
class Media:
    audio: bytes
    chunk: int | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str = "stop"


Inbound = Media | Dtmf | MarkPlayed | Stop | None
"""One provider message read: ``None`` for one with nothing to record (keep-alives, events
this adapter does not map)."""


class Framing(Protocol):
    """One provider's media-stream messages."""

    name: str

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        """The call, if these handshake messages are this provider's (``second`` is ``None``
        when the first message was already the start)."""

    def read(self, msg: dict[str, Any]) -> Inbound:
        """One message after the handshake."""

    def play(self, start: CallStart, audio_b64: str) -> dict[str, Any]:
        """The message that plays base64 audio (in the stream's format) to the caller."""

    def mark(self, start: CallStart, name: str) -> dict[str, Any]:
        """The message asking to be told once what was sent before has played."""

    def clear(self, start: CallStart) -> dict[str, Any]:
        """The message that drops the audio queued and not yet played."""


def get_path(msg: Any, *path: str) -> Any:
    """``msg[path[0]][path[1]]...`` or ``None`` where any step is missing or not a mapping."""
    for key in path:
        if not isinstance(msg, dict):
            return None
        msg = msg.get(key)
    return msg


def text(value: Any, limit: int = 256) -> str:
    """A provider id as text: strings (bounded) and numbers; anything else is ``""``."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, int | float):
        return str(value)
    return value[:limit] if isinstance(value, str) else ""


def number(value: Any) -> int | None:
    """Providers send numbers as strings or numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value)
    return None


def b64(payload: Any) -> bytes | None:
    """Decoded base64 audio, or ``None`` for anything that is not base64 text."""
    if not isinstance(payload, str):
        return None
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


class MediaStream:
    """What the providers' media streams share (they all follow one shape, Twilio's): inbound
    ``media`` / ``dtmf`` / a played mark / ``stop``, outbound ``media`` / ``mark`` / ``clear``.
    A provider sets where its shape differs and writes its own :meth:`detect`."""

    name = ""
    stream_key: str | None = None
    """The outbound messages' field naming the stream (``None``: the socket names it)."""
    mark_event = "mark"
    mark_name: tuple[str, ...] = ("mark", "name")
    stop_reason: tuple[str, ...] | None = None

    @staticmethod
    def start_message(first: dict[str, Any], second: dict[str, Any] | None
                      ) -> dict[str, Any] | None:
        """The ``start`` of a handshake that may open with ``connected``, or ``None``."""
        start = second if first.get("event") == "connected" else first
        if start is None or start.get("event") != "start":
            return None
        return start

    def read(self, msg: dict[str, Any]) -> Inbound:
        event = msg.get("event")
        if event == "media":
            audio = b64(get_path(msg, "media", "payload"))
            if audio is None:
                return None
            return Media(audio, number(get_path(msg, "media", "chunk")),
                         number(get_path(msg, "media", "timestamp")))
        if event == "dtmf":
            digit = text(get_path(msg, "dtmf", "digit"), 8)
            return Dtmf(digit) if digit else None
        if event == self.mark_event:
            name = text(get_path(msg, *self.mark_name))
            return MarkPlayed(name) if name else None
        if event == "stop":
            reason = text(get_path(msg, *self.stop_reason)) if self.stop_reason else ""
            return Stop(reason or "stop")
        return None

    def _outbound(self, start: CallStart, event: str, **body: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"event": event}
        if self.stream_key:
            msg[self.stream_key] = start.stream_id
        msg.update(body)
        return msg

    def play(self, start: CallStart, audio_b64: str) -> dict[str, Any]:
        return self._outbound(start, "media", media={"payload": audio_b64})

    def mark(self, start: CallStart, name: str) -> dict[str, Any]:
        return self._outbound(start, "mark", mark={"name": name})

    def clear(self, start: CallStart) -> dict[str, Any]:
        return self._outbound(start, "clear")
