"""Twilio Media Streams: ``connected`` (``protocol``: "Call") then ``start`` with a top-level
``streamSid`` and ``start.callSid`` / ``start.accountSid`` (camelCase); inbound ``media``
(``media.payload``: base64 8 kHz mu-law), ``dtmf`` (``dtmf.digit``), ``mark`` (``mark.name``,
once audio sent before it has played), ``stop``. Outbound ``media``, ``mark`` and ``clear``,
each naming the ``streamSid``."""

from __future__ import annotations

from typing import Any

from ._framing import CallStart, MediaStream, get_path, number, text

__all__ = ["TWILIO"]


class Twilio(MediaStream):
    name = "twilio"
    stream_key = "streamSid"

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        start = self.start_message(first, second)
        if start is None:
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


TWILIO = Twilio()
