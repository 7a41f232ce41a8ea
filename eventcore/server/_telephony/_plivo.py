"""Plivo audio streams: no ``connected``; the first message is ``start`` with
``start.streamId`` and ``start.callId`` (``start.accountId``, ``start.mediaFormat``:
``encoding``, ``sampleRate``); inbound ``media`` (``media.payload``), ``dtmf`` (``dtmf.digit``),
``playedStream`` (a checkpoint reached: ``name``) and ``clearedAudio``; the call's end closes
the socket (there is no ``stop``). Outbound ``playAudio`` (``media``: ``contentType``,
``sampleRate``, ``payload``), ``checkpoint`` (``streamId``, ``name``) and ``clearAudio``."""

from __future__ import annotations

from typing import Any

from ._framing import CallStart, MediaStream, get_path, number, text

__all__ = ["PLIVO"]


class Plivo(MediaStream):
    name = "plivo"
    mark_event = "playedStream"
    mark_name = ("name",)

    def detect(self, first: dict[str, Any], second: dict[str, Any] | None) -> CallStart | None:
        if second is not None or first.get("event") != "start":
            return None
        stream = text(get_path(first, "start", "streamId"))
        call = text(get_path(first, "start", "callId"))
        if not stream or not call:
            return None
        fmt = get_path(first, "start", "mediaFormat") or {}
        return CallStart(self.name, call, stream, text(get_path(first, "start", "accountId")),
                         encoding=text(get_path(fmt, "encoding")) or "audio/x-mulaw",
                         sample_rate=number(get_path(fmt, "sampleRate")) or 8000)

    def play(self, start: CallStart, audio_b64: str) -> dict[str, Any]:
        return {"event": "playAudio", "media": {"contentType": start.encoding,
                                                "sampleRate": start.sample_rate,
                                                "payload": audio_b64}}

    def mark(self, start: CallStart, name: str) -> dict[str, Any]:
        return {"event": "checkpoint", "streamId": start.stream_id, "name": name}

    def clear(self, start: CallStart) -> dict[str, Any]:
        return {"event": "clearAudio", "streamId": start.stream_id}


PLIVO = Plivo()
