"""Exotel voicebot / stream applets: ``connected`` then ``start`` with a top-level
``stream_sid`` and ``start.call_sid`` / ``start.account_sid`` (snake_case; ``start.media_format``:
``encoding``, ``sample_rate`` — raw 16-bit PCM by default); inbound ``media``
(``media.payload``), ``dtmf`` (``dtmf.digit``), ``mark`` (``mark.name``), ``stop``. Outbound
``media``, ``mark`` and ``clear``, each naming the ``stream_sid``."""

from __future__ import annotations

from typing import Any

from ._framing import CallStart, MediaStream, get_path, number, text

__all__ = ["EXOTEL"]


class Exotel(MediaStream):
    name = "exotel"
    stream_key = "stream_sid"
    stop_reason = ("stop", "reason")

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        start = self.start_message(first, second)
        if start is None:
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


EXOTEL = Exotel()
