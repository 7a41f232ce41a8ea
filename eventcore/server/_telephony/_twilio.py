"""Twilio Media Streams: ``connected`` (``protocol``: "Call") then ``start`` with a top-level
``streamSid`` and ``start.callSid`` / ``start.accountSid`` (camelCase); inbound ``media``
(``media.payload``: base64 8 kHz mu-law), ``dtmf`` (``dtmf.digit``), ``mark`` (``mark.name``,
once audio sent before it has played), ``stop``. Outbound ``media``, ``mark`` and ``clear``,
each naming the ``streamSid``."""

from __future__ import annotations

from typing import Any

from ._framing import CallStart, Dtmf, Inbound, MarkPlayed, Media, Stop, b64, get_path, number, text

__all__ = ["TWILIO"]


class Twilio:
    name = "twilio"

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        start = second if first.get("event") == "connected" else first
        if start is None or start.get("event") != "start":
            return None
        stream, call = text(start.get("streamSid")), text(get_path(start, "start", "callSid"))
        if not stream or not call:
            return None
        fmt = get_path(start, "start", "mediaFormat") or {}
        custom = get_path(start, "start", "customParameters")
        return CallStart(self.name, call, stream, text(get_path(start, "start", "accountSid")),
                         encoding=text(get_path(fmt, "encoding")) or "audio/x-mulaw",
                         sample_rate=number(get_path(fmt, "sampleRate")) or 8000,
                         custom=custom if isinstance(custom, dict) else {})

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
        return {"event": "media", "streamSid": start.stream_id, "media": {"payload": audio_b64}}

    def mark(self, start: CallStart, name: str) -> dict[str, Any]:
        return {"event": "mark", "streamSid": start.stream_id, "mark": {"name": name}}

    def clear(self, start: CallStart) -> dict[str, Any]:
        return {"event": "clear", "streamSid": start.stream_id}


TWILIO = Twilio()
