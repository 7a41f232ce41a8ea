"""WebRTC data channels for sessions (aiortc): ``events`` out, ``inputs`` in.

One :class:`WebRTCGateway` per API process answers SDP offers and hosts the peer connections in
its task group. Wire protocol (every message is one UTF-8 JSON text unless noted):

``events`` channel
    The client's first message says where to resume: ``{"after": N, "epoch": ".."?,
    "types": [..]?}`` (``epoch``: the stream epoch N was read in, ``"0"`` or the 16-digit
    generation an ``epoch`` or ``reset`` control said; anything else is a ``bad_resume``
    error). The server answers ``{"control": "ready", "after": N}`` and then sends every client
    envelope with seq > N, exactly as SSE does (``seq`` included, ``server_data`` never).
    Messages with a ``control`` key are not envelopes: ``ready``, ``end`` (after
    ``session.ended``), ``error``, ``gap`` (history trimmed everywhere; the stream continues at
    ``first_available``), ``reset`` (``{"control": "reset", "reason": "diverged", "after": ..,
    "resume_after": .., "epoch": .., "seen_epoch": .., "first_available": ..}``: a failover
    lost acknowledged appends and the history after ``resume_after`` may have been rewritten:
    discard what is held after it; the stream goes on from there in ``epoch``), ``epoch``
    (``{"control": "epoch", "epoch": G}`` right before the first envelope of another stream
    epoch than the resume's or the last one announced: the client resumes with ``epoch`` G) and
    ``chunk`` — an envelope too large for one message arrives as ``{"control": "chunk",
    "seq": N, "parts": K, "size": B}`` followed by K binary messages whose bytes, joined, are
    the envelope's JSON — and ``token_expired`` (``{"control": "token_expired", "last_seq":
    N}``: the credential that opened the peer has expired; the peer closes, and the client
    offers again with a fresh one, resuming after N) and ``session_deleted``
    (``{"control": "session_deleted", "last_seq": N, "incarnation": ..}``: the session the peer
    was opened for is gone before the channel reached its ``session.ended``; the peer closes,
    never carrying anything of a session created again under the id).
``inputs`` channel
    ``{"type": "input", "payload": ..., "idempotency_key": "..."?, "id": ..?}`` or
    ``{"type": "signal", "key": "...", "value": ..., "id": ..?}``. Each gets
    ``{"type": "ack", "id": .., "seq": N, "duplicate": bool}`` or ``{"type": "error", "id": ..,
    "status": 4xx|5xx, "error": code, "detail": text}``; a rejected message writes nothing. Once
    the session the peer was opened for is gone, a message gets ``404 session_deleted`` and the
    peer closes: nothing it sends lands in a session created again under the id.

Only host candidates are gathered (no STUN/TURN); a peer that disappears is noticed by ICE
consent freshness (RFC 7675) and closed, which frees its tasks. A peer that stays but stops
reading is closed once a send has waited ``send_timeout_s`` for room below the channel's
high-water mark: what it holds is that buffer and its follower's (bounded) hub buffer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Self

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from eventcore._follow import Followers, LogFollowers, closing_iter
from eventcore._keys import validate_session_id
from eventcore._log import EventLog
from eventcore.errors import (
    HistoryDiverged,
    HistoryGone,
    Overloaded,
    SessionNotFound,
    UsageError,
    ValidationError,
)

from ._clients import ClientFollow, StreamEnd, client_input, diverged_fields, parse_epoch
from ._webrtc_wire import (
    STREAM_ERRORS,
    Channel,
    Closed,
    InputMsg,
    Resume,
    Stalled,
    WebRTCLimits,
    check_offer,
    control,
    inbound_decoder,
    input_event_key,
    probe_id,
    refused,
    reply,
    resume_decoder,
)

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection

__all__ = ["WebRTCAnswer", "WebRTCGateway", "WebRTCLimits", "WebRTCStats", "input_event_key"]

logger = logging.getLogger("eventcore.webrtc")

EVENTS, INPUTS = "events", "inputs"
_RETRY_CAP_S = 5.0  # a follower waits at most this long between tries while Redis is away


@dataclass(slots=True)
class WebRTCStats:
    """Counters for metrics (the gateway itself does not depend on a metrics library)."""

    peers_opened: int = 0
    peers_closed: int = 0
    events_sent: int = 0
    inputs_accepted: int = 0
    inputs_rejected: int = 0
    slow_closed: int = 0


@dataclass(frozen=True, slots=True)
class WebRTCAnswer:
    peer_id: str
    sdp: str
    type: str = "answer"


@dataclass(eq=False, slots=True)
class Peer:
    """One live peer connection (read-only outside the gateway)."""

    peer_id: str
    session_id: str
    pc: RTCPeerConnection
    incarnation: str = ""  # the session's incarnation it was opened for
    writable: bool = True
    created_at: float = field(default_factory=time.time)
    closed: anyio.Event = field(default_factory=anyio.Event)
    expired: bool = False  # closing because its credential expired
    deleted: bool = False  # closing because its session is gone
    _scope: anyio.CancelScope | None = None  # its tasks: cancelled to close it


class WebRTCGateway:
    """Answers offers and runs the peer connections. ``async with WebRTCGateway(log):``;
    leaving the block closes every peer connection.

    ``followers`` is where ``events`` channels follow from: by default
    :class:`~eventcore._follow.LogFollowers` (one blocking read per peer); an API process
    passes its SSE hub so every follower shares the hub's live path. A Redis outage only
    pauses a follower: it resumes from its cursor."""

    def __init__(
        self,
        log: EventLog,
        *,
        followers: Followers | None = None,
        limits: WebRTCLimits | None = None,
    ) -> None:
        self.log = log
        self.followers: Followers = followers if followers is not None else LogFollowers(log)
        self.limits = limits or WebRTCLimits()
        self.stats = WebRTCStats()
        self._peers: dict[str, Peer] = {}
        self._pending: list[str] = []  # session ids of offers being answered
        self._tg: TaskGroup | None = None

    @property
    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close every peer connection."""
        if self._tg is not None:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(et, e, tb)

    async def answer(
        self, session_id: str, sdp: str, *, expires_at: float | None = None,
        writable: bool = True, incarnation: str | None = None,
    ) -> WebRTCAnswer:
        """Accept an SDP offer for ``session_id`` and return the answer (host candidates
        included: nothing trickles). The peer lives until it closes, fails ICE consent, does
        not connect within the timeout, reaches ``expires_at`` (the credential's expiry, Unix
        seconds), its session's incarnation ``incarnation`` (by default the current one) is
        gone, or the gateway closes. With ``writable=False`` (a read-only credential) the
        ``inputs`` channel refuses every message with a 403 error. Raises
        :class:`ValidationError` for a bad offer, :class:`SessionNotFound` (also where the
        session is another incarnation than ``incarnation`` now), or :class:`Overloaded` at
        the peer limits."""
        if self._tg is None:
            raise UsageError("WebRTCGateway is not started: use `async with`")
        validate_session_id(session_id)
        check_offer(sdp, self.limits)
        current = (await self.log.get_session(session_id)).incarnation
        if incarnation is not None and incarnation != current:
            raise SessionNotFound(session_id)
        # count offers still being answered too, or concurrent offers could pass the limits
        pending = list(self._pending)
        if len(self._peers) + len(pending) >= self.limits.max_peers:
            raise Overloaded(f"this server hosts its limit of {self.limits.max_peers} peers")
        same = sum(1 for p in self._peers.values() if p.session_id == session_id)
        if same + pending.count(session_id) >= self.limits.max_peers_per_session:
            raise Overloaded(f"session {session_id!r} has its limit of "
                             f"{self.limits.max_peers_per_session} peers")
        self._pending.append(session_id)
        try:
            result: WebRTCAnswer = await self._tg.start(
                self._run_peer, session_id, current, sdp, expires_at, writable
            )
        finally:
            self._pending.remove(session_id)
        return result

    # -- one peer --------------------------------------------------------------------------------
    async def _run_peer(
        self, session_id: str, incarnation: str, sdp: str, expires_at: float | None,
        writable: bool, *, task_status: TaskStatus[WebRTCAnswer],
    ) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        # iceServers=[]: aiortc would otherwise add a public STUN server; host candidates do
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peer = Peer(peer_id=f"p_{uuid.uuid4().hex[:16]}", session_id=session_id, pc=pc,
                    incarnation=incarnation, writable=writable)
        chan_send, chan_recv = anyio.create_memory_object_stream[Channel](4)
        state_send, state_recv = anyio.create_memory_object_stream[str](32)
        channels: list[Channel] = []

        def on_datachannel(channel: RTCDataChannel) -> None:
            for c in [c for c in channels if not c.open]:
                c.close()  # its handler has ended or is ending; release its streams
                channels.remove(c)
            wrapped = Channel(channel, self.limits, self._overflow)
            if channel.label not in (EVENTS, INPUTS) or any(
                c.label == channel.label for c in channels
            ):
                wrapped.close()  # unknown label, or one already open: refuse it, keep the peer
                return
            channels.append(wrapped)
            with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                chan_send.send_nowait(wrapped)

        def on_state() -> None:
            with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                state_send.send_nowait(pc.connectionState)

        pc.on("datachannel", on_datachannel)
        pc.on("connectionstatechange", on_state)
        try:
            with chan_send, chan_recv, state_send, state_recv:
                try:
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                    await pc.setLocalDescription(await pc.createAnswer())
                except Exception as exc:
                    raise ValidationError(
                        f"the SDP offer was refused: {type(exc).__name__}: {exc}"[:300]
                    ) from exc
                local = pc.localDescription
                self._peers[peer.peer_id] = peer
                self.stats.peers_opened += 1
                logger.info("webrtc peer %s opened for session %s", peer.peer_id, session_id)
                task_status.started(WebRTCAnswer(peer_id=peer.peer_id, sdp=local.sdp))
                try:
                    async with anyio.create_task_group() as tg:
                        peer._scope = tg.cancel_scope
                        tg.start_soon(self._watch, peer, state_recv, expires_at, tg.cancel_scope,
                                      name=f"webrtc {peer.peer_id} watch")
                        async for ch in chan_recv:
                            handler = self._events if ch.label == EVENTS else self._inputs
                            tg.start_soon(handler, peer, ch,
                                          name=f"webrtc {peer.peer_id} {ch.label}")
                except Exception:  # one broken peer must never take the gateway down
                    logger.exception("webrtc peer %s failed", peer.peer_id)
        finally:
            if self._peers.pop(peer.peer_id, None) is not None:
                self.stats.peers_closed += 1
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1):  # let queued notices leave before the teardown
                    for ch in channels:
                        await ch.flushed()
                with anyio.move_on_after(10):
                    await pc.close()
            for ch in channels:
                ch.close()
            peer.closed.set()
            logger.info("webrtc peer %s closed", peer.peer_id)

    async def _watch(
        self, peer: Peer, states: MemoryObjectReceiveStream[str], expires_at: float | None,
        scope: anyio.CancelScope,
    ) -> None:
        """Cancel the peer's tasks when it fails, closes, never connects, or its credential
        expires (a live connection must not outlive the token that opened it)."""
        budget = math.inf if expires_at is None else max(0.0, expires_at - time.time())
        with anyio.move_on_after(budget) as expiry:
            if await self._connected(peer, states):
                async for state in states:
                    if state in ("failed", "closed"):
                        break
        peer.expired = expiry.cancelled_caught
        scope.cancel()

    def _stalled(self, peer: Peer, ch: Channel) -> None:
        self.stats.slow_closed += 1
        logger.info("webrtc peer %s stopped reading its %s channel: closing it", peer.peer_id,
                    ch.label)
        _close(peer)

    def _deleted(self, peer: Peer) -> None:
        logger.info("webrtc peer %s: its session %s is gone: closing it", peer.peer_id,
                    peer.session_id)
        _close(peer)

    async def _connected(self, peer: Peer, states: MemoryObjectReceiveStream[str]) -> bool:
        with anyio.move_on_after(self.limits.connect_timeout_s):
            async for state in states:
                if state == "connected":
                    return True
                if state in ("failed", "closed"):
                    return False
        logger.info("webrtc peer %s did not connect in time", peer.peer_id)
        return False

    def _overflow(self, ch: Channel, message: str | bytes) -> None:
        """A peer sends faster than we process: refuse the message (nothing is written)."""
        if ch.label != INPUTS:
            return  # the events channel expects one message; a flood of them is dropped
        with contextlib.suppress(Closed):
            ch.send_now(reply("error", probe_id(message), status=429, error="busy",
                               detail="too many unacknowledged messages; slow down"))

    # -- events ----------------------------------------------------------------------------------
    async def _events(self, peer: Peer, ch: Channel) -> None:
        try:
            resume = await self._read_resume(ch)
            if resume is None:
                return
            await ch.send(control("ready", after=resume.after))
        except Closed:
            return
        async with anyio.create_task_group() as tg:

            async def until_closed() -> None:
                await self._refuse_more(ch)
                # the channel closed (its inbox ended): stop following for it now, or a client
                # reopening channels on one peer would pile up idle followers
                tg.cancel_scope.cancel()

            tg.start_soon(until_closed)
            await self._stream(peer, ch, resume)
            tg.cancel_scope.cancel()

    async def _read_resume(self, ch: Channel) -> Resume | None:
        async for raw in ch.messages():
            try:
                return resume_decoder.decode(raw)
            except msgspec.DecodeError as exc:
                await ch.send(control("error", error="bad_resume",
                                     detail=f'expected {{"after": N, "epoch": ".."?}}: {exc}'
                                     [:300]))
        return None

    async def _refuse_more(self, ch: Channel) -> None:
        with contextlib.suppress(Closed):
            async for _ in ch.messages():
                await ch.send(control("error", error="already_streaming",
                                     detail="the first message chose where to resume; open a "
                                            "new events channel to start elsewhere"))

    async def _stream(self, peer: Peer, ch: Channel, resume: Resume) -> None:
        generation = parse_epoch(resume.epoch)
        follow = ClientFollow(self.followers, peer.session_id, resume.after,
                              incarnation=peer.incarnation, types=resume.types,
                              retry_cap_s=_RETRY_CAP_S, generation=generation)
        announced = generation or "0"  # the epoch the client's cursor is in
        try:
            async with closing_iter(follow.items()) as items:
                async for item in items:
                    if isinstance(item, StreamEnd):
                        # final notices go out without a checkpoint: on shutdown this task is
                        # already cancelled when the hub ends its subscription, and the notice
                        # must still leave
                        self._end(peer, ch, item)
                        return
                    if isinstance(item, HistoryDiverged):
                        # the history after resume_after may have been rewritten: say so
                        await ch.send(control("reset", **diverged_fields(item)))
                        follow.sent = item.resume_after
                        announced = item.epoch
                        continue
                    if isinstance(item, HistoryGone):
                        # history is gone everywhere: say so, then carry on after the hole
                        await ch.send(control("gap", after=item.after,
                                               first_available=item.first_available))
                        follow.sent = item.resume_after
                        continue
                    for ev in item:
                        if ev.epoch != announced:
                            await ch.send(control("epoch", epoch=ev.epoch))
                            announced = ev.epoch
                        await ch.send_json(ev.seq, ev.data)
                        follow.sent = ev.seq
                        self.stats.events_sent += 1
        except Closed:
            pass
        except Stalled:
            self._stalled(peer, ch)
        except anyio.get_cancelled_exc_class():
            if peer.expired and not ch.mid_message:
                with contextlib.suppress(Closed):
                    ch.send_now(control("token_expired", last_seq=follow.sent))
            raise

    def _end(self, peer: Peer, ch: Channel, end: StreamEnd) -> None:
        with contextlib.suppress(Closed):
            if end.reason == "ended":
                ch.send_now(control("end", last_seq=end.last_seq))
            elif end.reason == "deleted":
                # not resumable: the id may name another session now, to be offered for afresh
                ch.send_now(control("session_deleted", last_seq=end.last_seq,
                                     incarnation=end.incarnation))
            else:
                # the hub shutting down, Redis gone for good, ...
                name = "HubClosed" if end.error is None else type(end.error).__name__
                ch.send_now(control("error", error=STREAM_ERRORS.get(name, "unavailable"),
                                     detail=str(end.error or "the event hub is shutting down"
                                                )[:300],
                                     last_seq=end.last_seq, retry=True))
        if end.reason == "deleted":
            self._deleted(peer)

    # -- inputs ----------------------------------------------------------------------------------
    async def _inputs(self, peer: Peer, ch: Channel) -> None:
        try:
            async for raw in ch.messages():
                accepted, reply = await self._handle_input(peer, raw)
                if accepted:
                    self.stats.inputs_accepted += 1
                else:
                    self.stats.inputs_rejected += 1
                await ch.send(reply)
                if peer.deleted:
                    self._deleted(peer)
                    return
        except Closed:
            pass
        except Stalled:
            self._stalled(peer, ch)

    async def _handle_input(self, peer: Peer, raw: str | bytes) -> tuple[bool, str]:
        """Append one inbound message; whether it was accepted, and the reply."""
        if len(raw) > self.limits.max_input_bytes:
            return refused(probe_id(raw) if len(raw) <= 1 << 20 else None, 413, "too_large",
                            f"messages are limited to {self.limits.max_input_bytes} bytes")
        try:
            msg = inbound_decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:  # too deep: past the C stack
            return refused(probe_id(raw), 400, "malformed", str(exc)[:300])
        if not peer.writable:
            return refused(msg.id, 403, "read_only",
                            "this connection was opened with a read-only token")
        if isinstance(msg, InputMsg):
            out = await client_input(self.log, peer.session_id, peer.incarnation, "input",
                                     payload=msg.payload, idempotency_key=msg.idempotency_key)
        else:
            out = await client_input(self.log, peer.session_id, peer.incarnation, "signal",
                                     key=msg.key, value=msg.value)
        if out.deleted:
            peer.deleted = True
        if not out.accepted:
            return refused(msg.id, out.status, out.error, out.detail)
        return True, reply("ack", msg.id, seq=out.seq, duplicate=out.duplicate)


def _close(peer: Peer) -> None:
    if peer._scope is not None:
        peer._scope.cancel()
