"""Telnyx media streaming: ``connected`` then ``start`` with a top-level ``stream_id`` and
``start.call_control_id`` (snake_case; ``start.media_format``: ``encoding``, ``sample_rate``);
inbound ``media`` (``media.payload``: base64 RTP payload), ``dtmf`` (``dtmf.digit``), ``mark``,
``stop``. Outbound (bidirectional streams) ``media`` (``media.payload``), ``mark`` and
``clear``; the socket names the stream, so they carry no id."""

from __future__ import annotations

from typing import Any

from ._framing import CallStart, MediaStream, get_path, number, text

__all__ = ["TELNYX"]

_ENCODINGS = {"PCMU": "audio/x-mulaw", "PCMA": "audio/x-alaw", "L16": "audio/x-l16"}


class Telnyx(MediaStream):
    name = "telnyx"

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        start = self.start_message(first, second)
        if start is None:
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


TELNYX = Telnyx()
