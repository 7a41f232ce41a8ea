"""The data channels' wire: message shapes, the channel wrapper (bounded inbox, flow-controlled
and chunked sends), offer checks and limits. The gateway (``_webrtc.py``) uses these."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import msgspec

from eventcore._codec import encode
from eventcore._keys import validate_key
from eventcore.errors import EventcoreError, ValidationError

from ._clients import ResumeAt

if TYPE_CHECKING:
    from aiortc import RTCDataChannel

__all__ = ["STREAM_ERRORS", "Channel", "Closed", "InputMsg", "Resume", "SignalMsg", "Stalled",
           "WebRTCLimits", "check_offer", "control", "inbound_decoder", "input_event_key",
           "probe_id", "refused", "reply", "resume_decoder"]


def input_event_key(idempotency_key: str) -> str:
    """The event key an input with this idempotency key is appended under. The same as the
    HTTP inputs endpoint's (``eventcore.server._http.input_event_key``; a test holds them
    equal), so a retry over either transport dedupes against the other."""
    return f"input:{validate_key(idempotency_key, 'idempotency_key')}"


@dataclass(frozen=True, slots=True)
class WebRTCLimits:
    """Bounds that keep one peer (or many) from costing the process more than this."""

    max_peers: int = 256
    max_peers_per_session: int = 8
    max_offer_bytes: int = 64 * 1024
    max_remote_candidates: int = 32
    max_input_bytes: int = 256 * 1024  # aiortc advertises 256 KiB as its max message size
    inbox: int = 64  # unprocessed inbound messages per channel before "busy" errors
    max_message_bytes: int = 64 * 1024  # RFC 8841's default max-message-size
    chunk_bytes: int = 16 * 1024  # the size every implementation interoperates at
    high_water_bytes: int = 1024 * 1024  # stop reading the log while this much is unsent
    send_timeout_s: float = 30.0  # a send waiting this long for room closes the peer
    connect_timeout_s: float = 30.0


# -- client messages ------------------------------------------------------------------------------
_Id = Annotated[str, msgspec.Meta(max_length=128)] | int | None


class Resume(ResumeAt, forbid_unknown_fields=True):
    """The events channel's first message."""


class InputMsg(msgspec.Struct, tag_field="type", tag="input", forbid_unknown_fields=True):
    payload: Any
    idempotency_key: str | None = None
    id: _Id = None


class SignalMsg(msgspec.Struct, tag_field="type", tag="signal", forbid_unknown_fields=True):
    key: str
    value: Any = None
    id: _Id = None


resume_decoder = msgspec.json.Decoder(Resume)
inbound_decoder = msgspec.json.Decoder(InputMsg | SignalMsg)
_id_probe = msgspec.json.Decoder(dict[str, Any])


class Closed(EventcoreError):
    """The data channel closed under us."""


class Stalled(EventcoreError):
    """The peer took nothing off the channel's buffer for the send timeout: it stopped reading
    (ICE consent alone would keep it open for good)."""


class Channel:
    """An RTCDataChannel seen through anyio: a bounded inbox and flow-controlled sends."""

    def __init__(self, channel: RTCDataChannel, limits: WebRTCLimits,
                 on_overflow: Callable[[Channel, str | bytes], None]) -> None:
        self.channel = channel
        self.label: str = channel.label
        self._limits = limits
        self._send, self.inbox = anyio.create_memory_object_stream[str | bytes](limits.inbox)
        self._low = anyio.Event()
        self._lock = anyio.Lock()
        self.mid_message = False  # between the parts of a chunked envelope
        channel.bufferedAmountLowThreshold = limits.high_water_bytes // 2
        channel.on("message", lambda m: self._receive(m, on_overflow))
        channel.on("bufferedamountlow", self._wake)
        channel.on("close", self._on_close)

    # aiortc callbacks: they run on the event loop and must never raise
    def _receive(self, message: str | bytes, on_overflow: Callable[[Channel, str | bytes], None]
                 ) -> None:
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:
            on_overflow(self, message)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def _wake(self) -> None:
        self._low.set()

    def _on_close(self) -> None:
        self._send.close()
        self._low.set()

    async def messages(self) -> AsyncIterator[str | bytes]:
        """Inbound messages until the channel closes (or is closed by the gateway)."""
        while True:
            try:
                yield await self.inbox.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return

    @property
    def open(self) -> bool:
        return self.channel.readyState == "open"

    def send_now(self, data: str | bytes) -> None:
        """Send without waiting for the buffer to drain (small control replies only)."""
        if not self.open:
            raise Closed
        try:
            self.channel.send(data)
        except Exception as exc:  # InvalidStateError when closing concurrently
            raise Closed from exc

    async def send(self, data: str | bytes) -> None:
        """Send once less than the high-water mark is queued: a slow peer slows only itself."""
        async with self._lock:
            await self._send_when_drained(data)

    async def _send_when_drained(self, data: str | bytes) -> None:
        while self.channel.bufferedAmount > self._limits.high_water_bytes:
            if not self.open:
                raise Closed
            self._low = anyio.Event()
            # a cancel scope only while blocked: a peer that reads costs none
            with anyio.move_on_after(self._limits.send_timeout_s) as waited:
                await self._low.wait()
            if waited.cancelled_caught:
                raise Stalled
        self.send_now(data)

    async def send_json(self, seq: int, body: bytes) -> None:
        """Send one envelope's JSON: as one text message, or chunked if it is too large (the
        lock keeps any other message from landing between the chunks)."""
        async with self._lock:
            if len(body) <= self._limits.max_message_bytes:
                await self._send_when_drained(body.decode())
                return
            size = self._limits.chunk_bytes
            parts = math.ceil(len(body) / size)
            await self._send_when_drained(encode({"control": "chunk", "seq": seq,
                                                  "parts": parts, "size": len(body)}).decode())
            self.mid_message = True
            for i in range(parts):
                await self._send_when_drained(body[i * size:(i + 1) * size])
            self.mid_message = False

    async def flushed(self) -> None:
        """Return once everything sent has left (or the channel closed)."""
        self.channel.bufferedAmountLowThreshold = 0
        while self.open and self.channel.bufferedAmount > 0:
            self._low = anyio.Event()
            await self._low.wait()

    def close(self) -> None:
        self._send.close()
        self.inbox.close()
        with contextlib.suppress(Exception):
            self.channel.close()


# by name: the hub (subscribers) is not a dependency of this module
STREAM_ERRORS = {"HubClosed": "shutting_down", "RedisUnavailable": "unavailable"}


def control(kind: str, **fields: Any) -> str:
    return encode({"control": kind, **fields}).decode()


def reply(kind: str, msg_id: Any, **fields: Any) -> str:
    return encode({"type": kind, "id": msg_id, **fields}).decode()


def probe_id(raw: str | bytes) -> Any:
    """The ``id`` of a message that failed validation, if it has a usable one (to correlate
    the error); never raises."""
    try:
        value = _id_probe.decode(raw).get("id")
    except (msgspec.DecodeError, AttributeError, RecursionError):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value if isinstance(value, str) and len(value) <= 128 else None


def check_offer(sdp: str, limits: WebRTCLimits) -> None:
    """Reject what aiortc should never see: oversized, media-bearing or unparsable offers."""
    from aiortc import sdp as aiortc_sdp

    if not isinstance(sdp, str) or not sdp.strip():
        raise ValidationError("the offer has no SDP")
    if len(sdp.encode("utf-8", errors="replace")) > limits.max_offer_bytes:
        raise ValidationError(f"the offer is over {limits.max_offer_bytes} bytes")
    try:
        parsed = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the input trips
        raise ValidationError(f"malformed SDP offer: {type(exc).__name__}: {exc}"[:300]) from exc
    kinds = [m.kind for m in parsed.media]
    if kinds != ["application"]:
        raise ValidationError(
            "the offer must have exactly one m=application section (data channels only); "
            f"got {kinds or 'none'}"
        )
    media = parsed.media[0]
    if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
        raise ValidationError("the offer lacks ICE credentials (a=ice-ufrag / a=ice-pwd)")
    if media.dtls is None or not media.dtls.fingerprints:
        raise ValidationError("the offer lacks a DTLS fingerprint (a=fingerprint)")
    if len(media.ice_candidates) > limits.max_remote_candidates:
        raise ValidationError(f"the offer has more than {limits.max_remote_candidates} "
                              "ICE candidates")



def refused(msg_id: Any, status: int, error: str, detail: str) -> tuple[bool, str]:
    return False, reply("error", msg_id, status=status, error=error, detail=detail[:300])
