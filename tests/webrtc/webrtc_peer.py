"""A real aiortc peer for tests: offers two data channels and speaks the gateway's protocol."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from anyio.streams.memory import MemoryObjectSendStream

Offer = Callable[[str], Awaitable[str]]  # offer SDP -> answer SDP


class Channel:
    """A client-side data channel with an inbox of decoded messages."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.opened = anyio.Event()
        self.closed = anyio.Event()
        self._send: MemoryObjectSendStream[Any]
        self._send, self.inbox = anyio.create_memory_object_stream[Any](10_000)
        channel.on("open", self.opened.set)
        channel.on("close", self._on_close)
        channel.on("message", self._on_message)

    def _on_message(self, message: str | bytes) -> None:
        self._send.send_nowait(message if isinstance(message, bytes) else json.loads(message))

    def _on_close(self) -> None:
        self.closed.set()
        self._send.close()

    def send(self, message: Any) -> None:
        self.channel.send(message if isinstance(message, str | bytes) else json.dumps(message))

    async def receive(self) -> Any:
        return await self.inbox.receive()

    async def envelope(self) -> dict[str, Any]:
        """The next envelope, reassembling chunked ones."""
        msg = await self.receive()
        if isinstance(msg, dict) and msg.get("control") == "chunk":
            parts = [await self.receive() for _ in range(msg["parts"])]
            assert all(isinstance(p, bytes) for p in parts)
            body = b"".join(parts)
            assert len(body) == msg["size"]
            env: dict[str, Any] = json.loads(body)
            assert env["seq"] == msg["seq"]
            return env
        assert isinstance(msg, dict) and "control" not in msg, msg
        return msg

    def aclose(self) -> None:
        self._send.close()
        self.inbox.close()


class Peer:
    def __init__(self, pc: RTCPeerConnection, events: Channel, inputs: Channel) -> None:
        self.pc = pc
        self.events = events
        self.inputs = inputs

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send on ``inputs`` and wait for the reply."""
        self.inputs.send(message)
        reply: dict[str, Any] = await self.inputs.receive()
        return reply

    async def aclose(self) -> None:
        await self.pc.close()
        self.events.aclose()
        self.inputs.aclose()


@contextlib.asynccontextmanager
async def connect(offer: Offer, *, labels: tuple[str, ...] = ("events", "inputs"),
                  open_within_s: float = 20) -> AsyncIterator[Peer]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channels = [Channel(pc.createDataChannel(label)) for label in labels]
    try:
        await pc.setLocalDescription(await pc.createOffer())
        answer = await offer(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        with anyio.fail_after(open_within_s):
            for ch in channels:
                await ch.opened.wait()
        peer = Peer(pc, *channels[:2]) if len(channels) >= 2 else Peer(pc, channels[0],
                                                                       channels[0])
        yield peer
    finally:
        with anyio.CancelScope(shield=True):
            await pc.close()
        for ch in channels:
            ch.aclose()
