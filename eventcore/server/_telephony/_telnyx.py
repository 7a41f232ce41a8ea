"""Telnyx media streaming: ``connected`` then ``start`` with a top-level ``stream_id`` and
``start.call_control_id`` (snake_case; ``start.media_format``: ``encoding``, ``sample_rate``);
inbound ``media`` (``media.payload``: base64 RTP payload), ``dtmf`` (``dtmf.digit``), ``mark``,
``stop``. Outbound (bidirectional streams) ``media`` (``media.payload``), ``mark`` and
``clear``; the socket names the stream, so they carry no id."""

from __future__ import annotations

from typing import Any

from ._framing import CallStart, Dtmf, Inbound, MarkPlayed, Media, Stop, b64, get_path, number, text

__all__ = ["TELNYX"]

_ENCODINGS = {"PCMU": "audio/x-mulaw", "PCMA": "audio/x-alaw", "L16": "audio/x-l16"}


class Telnyx:
    name = "telnyx"

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        start = second if first.get("event") == "connected" else first
        if start is None or start.get("event") != "start":
            return None
        stream = text(start.get("stream_id"))
        call = text(get_path(start, "start", "call_control_id"))
        if not stream or not call:
            return None
        fmt = get_path(start, "start", "media_format") or {}
        enc = text(get_path(fmt, "encoding"))
        return CallStart(self.name, call, stream, text(get_path(start, "start", "user_id")),
                         encoding=_ENCODINGS.get(enc.upper(), enc or "audio/x-mulaw"),
                         sample_rate=number(get_path(fmt, "sample_rate")) or 8000)

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
        if event == "mark":
            name = text(get_path(msg, "mark", "name"))
            return MarkPlayed(name) if name else None
        if event == "stop":
            return Stop()
        return None

    def play(self, start: CallStart, audio_b64: str) -> dict[str, Any]:
        return {"event": "media", "media": {"payload": audio_b64}}

    def mark(self, start: CallStart, name: str) -> dict[str, Any]:
        return {"event": "mark", "mark": {"name": name}}

    def clear(self, start: CallStart) -> dict[str, Any]:
        return {"event": "clear"}


TELNYX = Telnyx()
