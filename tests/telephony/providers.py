"""Fake providers: each speaks its provider's documented media-stream messages (the shapes in
the providers' public docs) as a real WebSocket client, and reads what the server sends it."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


def _b64(audio: bytes) -> str:
    return base64.b64encode(audio).decode()


@dataclass
class FakeProvider:
    name: str
    call_id: str = field(default_factory=lambda: f"CA{uuid.uuid4().hex}")
    stream_id: str = field(default_factory=lambda: f"MZ{uuid.uuid4().hex}")
    account_id: str = "AC" + "0" * 32
    seq: int = 0
    chunk: int = 0
    ws: ClientConnection | None = None

    def _n(self) -> int:
        self.seq += 1
        return self.seq

    # -- the provider's messages ----------------------------------------------------------
    def handshake(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def media(self, audio: bytes) -> dict[str, Any]:
        raise NotImplementedError

    def dtmf(self, digit: str) -> dict[str, Any]:
        raise NotImplementedError

    def mark_played(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self) -> dict[str, Any] | None:
        """``None``: the provider just closes the socket (Plivo)."""
        raise NotImplementedError

    # -- what the server must send it -----------------------------------------------------
    def expected_play(self, audio_b64: str) -> dict[str, Any]:
        raise NotImplementedError

    def expected_mark(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def expected_clear(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- the socket -------------------------------------------------------------------------
    async def connect(self, url: str) -> ClientConnection:
        self.ws = await connect(url, max_size=None, open_timeout=10)
        for msg in self.handshake():
            await self.send(msg)
        return self.ws

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(msg))

    async def recv(self) -> dict[str, Any]:
        assert self.ws is not None
        out: dict[str, Any] = json.loads(await self.ws.recv())
        return out

    async def hang_up(self) -> None:
        assert self.ws is not None
        msg = self.stop()
        if msg is not None:
            await self.send(msg)
        await self.ws.close()


class Twilio(FakeProvider):
    def handshake(self) -> list[dict[str, Any]]:
        return [{"event": "connected", "protocol": "Call", "version": "1.0.0"},
                {"event": "start", "sequenceNumber": str(self._n()), "streamSid": self.stream_id,
                 "start": {"streamSid": self.stream_id, "accountSid": self.account_id,
                           "callSid": self.call_id, "tracks": ["inbound"],
                           "customParameters": {"lang": "en"},
                           "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                           "channels": 1}}}]

    def media(self, audio: bytes) -> dict[str, Any]:
        self.chunk += 1
        return {"event": "media", "sequenceNumber": str(self._n()), "streamSid": self.stream_id,
                "media": {"track": "inbound", "chunk": str(self.chunk),
                          "timestamp": str(20 * self.chunk), "payload": _b64(audio)}}

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "streamSid": self.stream_id, "sequenceNumber": str(self._n()),
                "dtmf": {"track": "inbound_track", "digit": digit}}

    def mark_played(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "sequenceNumber": str(self._n()), "streamSid": self.stream_id,
                "mark": {"name": name}}

    def stop(self) -> dict[str, Any] | None:
        return {"event": "stop", "sequenceNumber": str(self._n()), "streamSid": self.stream_id,
                "stop": {"accountSid": self.account_id, "callSid": self.call_id}}

    def expected_play(self, audio_b64: str) -> dict[str, Any]:
        return {"event": "media", "streamSid": self.stream_id, "media": {"payload": audio_b64}}

    def expected_mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "streamSid": self.stream_id, "mark": {"name": name}}

    def expected_clear(self) -> dict[str, Any]:
        return {"event": "clear", "streamSid": self.stream_id}


class Telnyx(FakeProvider):
    def handshake(self) -> list[dict[str, Any]]:
        return [{"event": "connected", "version": "1.0.0"},
                {"event": "start", "sequence_number": str(self._n()),
                 "start": {"user_id": self.account_id, "call_control_id": self.call_id,
                           "client_state": "", "media_format": {"encoding": "PCMU",
                                                                "sample_rate": 8000,
                                                                "channels": 1}},
                 "stream_id": self.stream_id}]

    def media(self, audio: bytes) -> dict[str, Any]:
        self.chunk += 1
        return {"event": "media", "sequence_number": str(self._n()),
                "media": {"track": "inbound", "chunk": str(self.chunk),
                          "timestamp": str(20 * self.chunk), "payload": _b64(audio)},
                "stream_id": self.stream_id}

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "stream_id": self.stream_id, "occurred_at": "2026-01-01T00:00Z",
                "sequence_number": str(self._n()), "dtmf": {"digit": digit}}

    def mark_played(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "sequence_number": str(self._n()), "stream_id": self.stream_id,
                "mark": {"name": name}}

    def stop(self) -> dict[str, Any] | None:
        return {"event": "stop", "sequence_number": str(self._n()),
                "stop": {"user_id": self.account_id, "call_control_id": self.call_id},
                "stream_id": self.stream_id}

    def expected_play(self, audio_b64: str) -> dict[str, Any]:
        return {"event": "media", "media": {"payload": audio_b64}}

    def expected_mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "mark": {"name": name}}

    def expected_clear(self) -> dict[str, Any]:
        return {"event": "clear"}


class Plivo(FakeProvider):
    def handshake(self) -> list[dict[str, Any]]:
        return [{"event": "start", "sequenceNumber": self._n(),
                 "start": {"callId": self.call_id, "streamId": self.stream_id,
                           "accountId": self.account_id, "tracks": ["inbound"],
                           "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
                 "extra_headers": "k=v"}]

    def media(self, audio: bytes) -> dict[str, Any]:
        self.chunk += 1
        return {"event": "media", "sequenceNumber": self._n(), "streamId": self.stream_id,
                "media": {"track": "inbound", "timestamp": str(20 * self.chunk),
                          "chunk": self.chunk, "payload": _b64(audio)}}

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "sequenceNumber": self._n(), "streamId": self.stream_id,
                "dtmf": {"track": "inbound", "digit": digit, "timestamp": "1"}}

    def mark_played(self, name: str) -> dict[str, Any]:
        return {"event": "playedStream", "sequenceNumber": self._n(),
                "streamId": self.stream_id, "name": name}

    def stop(self) -> dict[str, Any] | None:
        return None  # Plivo closes the socket when the call ends

    def expected_play(self, audio_b64: str) -> dict[str, Any]:
        return {"event": "playAudio", "media": {"contentType": "audio/x-mulaw",
                                                "sampleRate": 8000, "payload": audio_b64}}

    def expected_mark(self, name: str) -> dict[str, Any]:
        return {"event": "checkpoint", "streamId": self.stream_id, "name": name}

    def expected_clear(self) -> dict[str, Any]:
        return {"event": "clearAudio", "streamId": self.stream_id}


class Exotel(FakeProvider):
    def handshake(self) -> list[dict[str, Any]]:
        return [{"event": "connected"},
                {"event": "start", "sequence_number": str(self._n()), "stream_sid": self.stream_id,
                 "start": {"stream_sid": self.stream_id, "call_sid": self.call_id,
                           "account_sid": self.account_id, "from": "+10000000000",
                           "to": "+10000000001", "custom_parameters": {"k": "v"},
                           "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000",
                                            "bit_rate": "16"}}}]

    def media(self, audio: bytes) -> dict[str, Any]:
        self.chunk += 1
        return {"event": "media", "sequence_number": str(self._n()), "stream_sid": self.stream_id,
                "media": {"chunk": str(self.chunk), "timestamp": str(20 * self.chunk),
                          "payload": _b64(audio)}}

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "sequence_number": str(self._n()), "stream_sid": self.stream_id,
                "dtmf": {"digit": digit, "duration": "100"}}

    def mark_played(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "sequence_number": str(self._n()), "stream_sid": self.stream_id,
                "mark": {"name": name}}

    def stop(self) -> dict[str, Any] | None:
        return {"event": "stop", "sequence_number": str(self._n()), "stream_sid": self.stream_id,
                "stop": {"call_sid": self.call_id, "account_sid": self.account_id,
                         "reason": "callended"}}

    def expected_play(self, audio_b64: str) -> dict[str, Any]:
        return {"event": "media", "stream_sid": self.stream_id, "media": {"payload": audio_b64}}

    def expected_mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "stream_sid": self.stream_id, "mark": {"name": name}}

    def expected_clear(self) -> dict[str, Any]:
        return {"event": "clear", "stream_sid": self.stream_id}


PROVIDERS: dict[str, type[FakeProvider]] = {
    "twilio": Twilio, "telnyx": Telnyx, "plivo": Plivo, "exotel": Exotel}


def make(name: str) -> FakeProvider:
    return PROVIDERS[name](name)
