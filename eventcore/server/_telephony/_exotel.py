"""Exotel voicebot / stream applets: ``connected`` then ``start`` with a top-level
``stream_sid`` and ``start.call_sid`` / ``start.account_sid`` (snake_case; ``start.media_format``:
``encoding``, ``sample_rate`` — raw 16-bit PCM by default); inbound ``media``
(``media.payload``), ``dtmf`` (``dtmf.digit``), ``mark`` (``mark.name``), ``stop``. Outbound
``media``, ``mark`` and ``clear``, each naming the ``stream_sid``."""

from __future__ import annotations

from typing import Any

from ._framing import CallStart, Dtmf, Inbound, MarkPlayed, Media, Stop, b64, get_path, number, text

__all__ = ["EXOTEL"]


class Exotel:
    name = "exotel"

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        start = second if first.get("event") == "connected" else first
        if start is None or start.get("event") != "start":
            return None
        stream = text(start.get("stream_sid")) or text(get_path(start, "start", "stream_sid"))
        call = text(get_path(start, "start", "call_sid"))
        account = text(get_path(start, "start", "account_sid"))
        if not stream or not call or not account:
            return None
        fmt = get_path(start, "start", "media_format") or {}
        custom = get_path(start, "start", "custom_parameters")
        return CallStart(self.name, call, stream, account,
                         encoding=text(get_path(fmt, "encoding")) or "audio/x-raw",
                         sample_rate=number(get_path(fmt, "sample_rate")) or 8000,
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
            return Stop(text(get_path(msg, "stop", "reason")) or "stop")
        return None

    def play(self, start: CallStart, audio_b64: str) -> dict[str, Any]:
        return {"event": "media", "stream_sid": start.stream_id, "media": {"payload": audio_b64}}

    def mark(self, start: CallStart, name: str) -> dict[str, Any]:
        return {"event": "mark", "stream_sid": start.stream_id, "mark": {"name": name}}

    def clear(self, start: CallStart) -> dict[str, Any]:
        return {"event": "clear", "stream_sid": start.stream_id}


EXOTEL = Exotel()
