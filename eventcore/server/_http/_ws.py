"""``GET /v1/sessions/{id}/ws``: a session over one WebSocket, with the semantics of SSE and
the WebRTC data channels (the README's "WebSocket" section is the user-facing description).

Every message is one JSON text frame; the server never sends binary frames and refuses them.

Client → server
    ``{"type": "hello", "after": N, "epoch": ".."?, "types": [..]?, "token": ".."?}`` first,
    exactly once: where to resume (the last seq it has, 0 for all; ``epoch``: the stream epoch
    that seq was read in, ``"0"`` or the 16-digit generation an ``events`` message or ``reset``
    said — anything else closes 1007) and, unless the upgrade request carried a
    credential (``Authorization: Bearer`` or the subprotocol ``eventcore.token.<credential>``
    next to ``eventcore.v1``), the credential. The API key is never read from the URL.
    Then any number of ``{"type": "input", "payload": .., "idempotency_key": ".."?, "id": ..?}``
    and ``{"type": "signal", "key": "..", "value": .., "id": ..?}``: the same appends as
    ``POST /v1/sessions/{id}/inputs`` and ``/signals`` (the same event key for an idempotency
    key, so a retry over any transport dedupes against the others), each answered
    ``{"type": "ack", "id": .., "seq": N, "duplicate": bool}`` or, refused with nothing
    written, ``{"type": "error", "id": .., "status": 4xx|5xx, "error": code, "detail": ..}``
    (read-only token, session ended, payload too large, ...; the connection stays open).
Server → client
    ``{"type": "ready", "after": N, "session_id": .., "incarnation": ..}`` once, then
    ``{"type": "events", "events": [envelope, ...]}`` — client envelopes with seq > N in seq
    order, exactly once each on the connection (``server_data`` never), with ``"epoch": G``
    (the last event's stream epoch) once the session's epoch is not ``"0"`` (after a failover
    lost acknowledged appends): the client resumes with ``hello.after`` and ``hello.epoch`` —
    and ``{"type": "reset", "after": .., "first_available": .., "resume_after": ..}`` where
    history is gone everywhere, or ``{"type": "reset", "reason": "diverged", "after": ..,
    "resume_after": .., "epoch": .., "seen_epoch": .., "first_available": ..}`` where the
    history after ``resume_after`` may have been rewritten: discard what is held after it; the
    stream goes on from there in ``epoch``. The last message before the server closes says
    why: ``end`` (``last_seq``; after ``session.ended``), ``shutdown`` (``resume_after``,
    ``retry_ms``), ``token_expired`` (``resume_after``), ``session_deleted`` (``last_seq``,
    ``incarnation``), ``error`` (``resume_after``; Redis unavailable past the retry budget).

Close codes (:data:`CLOSE_CODES`): 1000 the session ended and everything was sent; 1003 a
binary frame; 1007 a frame that is not JSON or not a valid message of its type; 1008 an
unknown message type, or a message out of order (no ``hello`` first, a second one); 1009 a
frame over ``max_message_bytes``; 1011 Redis unavailable (resume); 1012 the server is
restarting (resume on any server); 1013 the server is starting; 4400 a bad session id; 4401
no or an invalid credential, or it expired (resume with a fresh one); 4403 a token of another
session; 4404 the session does not exist or was deleted; 4408 no ``hello`` within
``hello_timeout_s``. A frame that makes the server close writes nothing.

Slow clients follow the hub's rules (one bounded buffer per client, catch-up at its own pace);
a client that accepts no bytes for the SSE send timeout is disconnected at the transport.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import msgspec
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketState

from eventcore._follow import closing_iter
from eventcore._keys import validate_session_id
from eventcore.errors import EventcoreError, HistoryDiverged, HistoryGone, SessionNotFound

from .._clients import (
    ClientFollow,
    ResumeAt,
    StreamEnd,
    client_input,
    diverged_fields,
    parse_epoch,
)
from .._webrtc_wire import InputMsg, SignalMsg, reply
from ._auth import Principal, check_incarnation
from ._problems import Problem
from ._transport import ABORT_EXTENSION

if TYPE_CHECKING:
    from ._context import ServiceContext

__all__ = ["CLOSE_CODES", "SUBPROTOCOL", "TOKEN_PREFIX", "Hello", "WsClosed", "WsConn", "WsLimits",
           "decode_message", "router"]

logger = logging.getLogger("eventcore.server")

SUBPROTOCOL = "eventcore.v1"
TOKEN_PREFIX = "eventcore.token."
RETRY_MS = 1000
_CHUNK_BYTES = 64 * 1024

CLOSE_CODES: dict[str, int] = {
    "ended": 1000, "binary": 1003, "invalid": 1007, "policy": 1008, "too_large": 1009,
    "unavailable": 1011, "restarting": 1012, "starting": 1013, "bad_session_id": 4400,
    "unauthorized": 4401, "forbidden": 4403, "not_found": 4404, "hello_timeout": 4408,
}


@dataclass(frozen=True, slots=True)
class WsLimits:
    """Bounds for one WebSocket client."""

    max_message_bytes: int = 256 * 1024
    hello_timeout_s: float = 10.0


class WsClosed(EventcoreError):
    """The connection is closed (by the peer, or by us with ``code``)."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"websocket closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


def _reason(text: str) -> str:
    """A close reason within the protocol's 123 bytes."""
    raw = text.encode()[:120]
    return raw.decode(errors="ignore")


class WsConn:
    """One accepted WebSocket seen as JSON text frames: sends serialized by a lock and bounded
    by ``send_timeout_s`` (past it the connection is reset at the transport: a peer that stopped
    reading would otherwise pin its unsent bytes), receives checked for kind and size. Shared by
    the session socket and the telephony media streams."""

    def __init__(self, ws: WebSocket, *, send_timeout_s: float, max_message_bytes: int,
                 on_stalled: Callable[[], None] | None = None) -> None:
        self.ws = ws
        self.send_timeout_s = send_timeout_s
        self.max_message_bytes = max_message_bytes
        self.on_stalled = on_stalled
        self._lock = anyio.Lock()
        self.closed: WsClosed | None = None

    async def send(self, text: str | bytes) -> None:
        if self.closed is not None:
            raise self.closed
        data = text.decode() if isinstance(text, bytes) else text
        async with self._lock:
            with anyio.move_on_after(self.send_timeout_s) as waited:
                try:
                    await self.ws.send({"type": "websocket.send", "text": data})
                except Exception as exc:  # ClientDisconnected, a send after close, ...
                    self.closed = WsClosed(1006, "the peer went away")
                    raise self.closed from exc
            if waited.cancelled_caught:
                self._abort()
                raise self.closed or WsClosed(1006, "stalled")

    def _abort(self) -> None:
        self.closed = WsClosed(1006, "the peer stopped reading")
        if self.on_stalled is not None:
            self.on_stalled()
        fn = (self.ws.scope.get("extensions") or {}).get(ABORT_EXTENSION)
        if fn is not None:
            fn()
            logger.info("disconnected a WebSocket client that stopped reading")

    async def receive_text(self) -> str:
        """The next text frame; closes with the documented code for a binary or oversized one
        (and raises :class:`WsClosed`)."""
        if self.closed is not None:
            raise self.closed
        try:
            msg = await self.ws.receive()
        except Exception as exc:  # receive after a disconnect
            self.closed = WsClosed(1006, "gone")
            raise self.closed from exc
        if msg["type"] == "websocket.disconnect":
            self.closed = WsClosed(int(msg.get("code") or 1005), str(msg.get("reason") or ""))
            raise self.closed
        text = msg.get("text")
        if text is None:
            await self.close("binary", "binary frames are not accepted: send JSON text frames")
            raise WsClosed(CLOSE_CODES["binary"])
        if len(text) > self.max_message_bytes and len(text.encode()) > self.max_message_bytes:
            await self.close("too_large", f"messages are limited to {self.max_message_bytes} "
                             "bytes")
            raise WsClosed(CLOSE_CODES["too_large"])
        assert isinstance(text, str)
        return text

    async def close(self, why: str | int, reason: str = "") -> None:
        """Close with ``CLOSE_CODES[why]`` (or the code ``why``); never raises."""
        code = why if isinstance(why, int) else CLOSE_CODES[why]
        if self.closed is not None:
            return
        self.closed = WsClosed(code, reason)
        with anyio.move_on_after(self.send_timeout_s, shield=True) as waited:
            with contextlib.suppress(Exception):
                if self.ws.application_state == WebSocketState.CONNECTING:
                    await self.ws.accept()
                if self.ws.application_state == WebSocketState.CONNECTED:
                    await self.ws.close(code, _reason(reason))
        if waited.cancelled_caught:
            self._abort()


def _control(kind: str, **fields: Any) -> str:
    return msgspec.json.encode({"type": kind, **fields}).decode()


class _Typed(msgspec.Struct):
    type: str


class Hello(ResumeAt, tag_field="type", tag="hello", forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(max_length=4096)] | None = None


_typed = msgspec.json.Decoder(_Typed)
_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "hello": msgspec.json.Decoder(Hello),
    "input": msgspec.json.Decoder(InputMsg),
    "signal": msgspec.json.Decoder(SignalMsg),
}


class _BadFrame(EventcoreError):
    def __init__(self, why: Literal["invalid", "policy"], detail: str) -> None:
        super().__init__(detail)
        self.why = why
        self.detail = detail


def decode_message(raw: str) -> Hello | InputMsg | SignalMsg:
    """One client message, or :class:`_BadFrame` (``invalid``: not JSON / wrong fields;
    ``policy``: an unknown type)."""
    try:
        kind = _typed.decode(raw).type
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _BadFrame("invalid", f"not a JSON object with a string type: {exc}") from None
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise _BadFrame("policy", f"unknown message type {kind[:40]!r}: expected hello, "
                        "input or signal")
    try:
        msg: Hello | InputMsg | SignalMsg = decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _BadFrame("invalid", f"invalid {kind} message: {exc}") from None
    return msg


router = APIRouter()


@router.websocket("/v1/sessions/{session_id}/ws")
async def session_socket(websocket: WebSocket, session_id: str) -> None:
    """The session's envelopes out, inputs and signals in (see the module doc)."""
    offered = websocket.scope.get("subprotocols") or []
    ctx: ServiceContext | None = getattr(websocket.app.state, "eventcore", None)
    limits: WsLimits = ctx.extras.get("ws_limits", WsLimits()) if ctx is not None else WsLimits()
    conn = WsConn(websocket, send_timeout_s=ctx.settings.sse_send_timeout_s if ctx else 5.0,
                  max_message_bytes=limits.max_message_bytes)
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    if ctx is None:
        await conn.close("starting", "the service is starting: retry shortly")
        return
    with contextlib.suppress(WsClosed):
        await _serve(ctx, conn, session_id, offered, limits)


async def _serve(ctx: ServiceContext, conn: WsConn, session_id: str, offered: list[str],
                 limits: WsLimits) -> None:
    try:
        validate_session_id(session_id)
    except ValueError as exc:
        await conn.close("bad_session_id", str(exc))
        return
    hello: Hello | None = None
    with anyio.move_on_after(limits.hello_timeout_s):
        hello = await _first(conn)
    if hello is None:
        await conn.close("hello_timeout", f"send hello within {limits.hello_timeout_s:g}s")
        return
    credential = _upgrade_credential(conn.ws, offered) or hello.token
    try:
        if not credential:
            raise Problem(401, "unauthorized", "credentials required: Authorization header, "
                          f"subprotocol {TOKEN_PREFIX}<credential> or hello.token")
        principal = ctx.auth.verify(credential)
        if not principal.may(session_id, write=False):
            await conn.close("forbidden", "this token may not access this session")
            return
        await check_incarnation(principal, ctx.log, session_id)
        info = await ctx.log.get_session(session_id)
    except Problem as exc:
        await conn.close("unauthorized" if exc.status == 401 else "forbidden",
                         exc.detail or exc.slug)
        return
    except SessionNotFound as exc:
        await conn.close("not_found", str(exc))
        return
    except EventcoreError as exc:
        await conn.close("unavailable", str(exc))
        return
    incarnation = info.incarnation if principal.admin else principal.incarnation
    if ctx.hub.closed or ctx.shutdown.is_set():
        await conn.close("restarting", "the server is shutting down: resume on another")
        return
    await conn.send(_control("ready", after=hello.after, session_id=session_id,
                             incarnation=incarnation))
    await _session(ctx, conn, session_id, incarnation, hello, principal)


async def _first(conn: WsConn) -> Hello | None:
    raw = await conn.receive_text()
    try:
        msg = decode_message(raw)
    except _BadFrame as exc:
        await conn.close(exc.why, exc.detail)
        return None
    if not isinstance(msg, Hello):
        await conn.close("policy", "the first message must be hello")
        return None
    return msg


def _upgrade_credential(ws: WebSocket, offered: list[str]) -> str | None:
    auth = ws.headers.get("authorization")
    if auth:
        scheme, _, cred = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and cred.strip():
            return cred.strip()
    for proto in offered:
        if proto.startswith(TOKEN_PREFIX) and len(proto) > len(TOKEN_PREFIX):
            return proto[len(TOKEN_PREFIX):]
    return None


async def _session(ctx: ServiceContext, conn: WsConn, session_id: str, incarnation: str,
                   hello: Hello, principal: Principal) -> None:
    follow = ClientFollow(ctx.hub, session_id, hello.after, incarnation=incarnation,
                          types=hello.types, generation=parse_epoch(hello.epoch))
    expires_at = principal.expires_at
    budget = math.inf if expires_at is None else max(0.0, expires_at - time.time())
    writable = principal.may(session_id, write=True)
    ending: list[Callable[[], Awaitable[None]]] = []
    with anyio.move_on_after(budget) as expiry:
        async with anyio.create_task_group() as tg:

            async def inputs() -> None:
                with contextlib.suppress(WsClosed):
                    await _inputs(ctx, conn, follow, writable, ending)
                tg.cancel_scope.cancel()

            tg.start_soon(inputs)
            with contextlib.suppress(WsClosed):
                await _stream(conn, follow, ending)
            tg.cancel_scope.cancel()
    if expiry.cancelled_caught:
        with contextlib.suppress(WsClosed):
            await conn.send(_control("token_expired", resume_after=follow.sent))
        await conn.close("unauthorized", "the token has expired: reconnect with a fresh one "
                         "and hello.after to resume")
        return
    for end in ending[:1]:
        await end()


async def _stream(conn: WsConn, follow: ClientFollow,
                  ending: list[Callable[[], Awaitable[None]]]) -> None:
    async with closing_iter(follow.items()) as items:
        async for item in items:
            if isinstance(item, StreamEnd):
                ending.append(functools.partial(_finish, conn, item))
                return
            if isinstance(item, HistoryDiverged):
                await conn.send(_control("reset", **diverged_fields(item)))
                follow.sent = item.resume_after
                continue
            if isinstance(item, HistoryGone):
                await conn.send(_control("reset", after=item.after,
                                         first_available=item.first_available,
                                         resume_after=item.resume_after))
                follow.sent = item.resume_after
                continue
            parts: list[bytes] = []
            size = 0
            for i, ev in enumerate(item):
                parts.append(ev.data)
                size += len(ev.data)
                if size >= _CHUNK_BYTES or i == len(item) - 1:
                    # the cursor's epoch once it is not 0, as SSE ids carry it
                    tail = b"]}" if ev.epoch == "0" else b'],"epoch":"' + ev.epoch.encode() + b'"}'
                    await conn.send(b'{"type":"events","events":[' + b",".join(parts) + tail)
                    follow.sent = ev.seq
                    parts, size = [], 0


async def _finish(conn: WsConn, end: StreamEnd) -> None:
    with contextlib.suppress(WsClosed):
        if end.reason == "ended":
            await conn.send(_control("end", last_seq=end.last_seq))
            await conn.close("ended", "the session has ended")
        elif end.reason == "shutdown":
            await conn.send(_control("shutdown", resume_after=end.last_seq, retry_ms=RETRY_MS))
            await conn.close("restarting", "the server is shutting down: resume on any server")
        elif end.reason == "deleted":
            await conn.send(_control("session_deleted", last_seq=end.last_seq,
                                     incarnation=end.incarnation))
            await conn.close("not_found", "the session was deleted")
        else:
            await conn.send(_control("error", error="unavailable",
                                     detail=str(end.error)[:300], resume_after=end.last_seq))
            await conn.close("unavailable", "the log is unavailable: resume shortly")


async def _inputs(ctx: ServiceContext, conn: WsConn, follow: ClientFollow, writable: bool,
                  ending: list[Callable[[], Awaitable[None]]]) -> None:
    session_id, incarnation = follow.session_id, follow.incarnation
    while True:
        raw = await conn.receive_text()
        try:
            msg = decode_message(raw)
        except _BadFrame as exc:
            await conn.close(exc.why, exc.detail)
            return
        if isinstance(msg, Hello):
            await conn.close("policy", "hello was already sent: reconnect to resume elsewhere")
            return
        if not writable:
            await conn.send(reply("error", msg.id, status=403, error="read_only",
                                  detail="this connection was opened with a read-only token"))
            continue
        if isinstance(msg, InputMsg):
            out = await client_input(ctx.log, session_id, incarnation, "input",
                                     payload=msg.payload, idempotency_key=msg.idempotency_key)
        else:
            out = await client_input(ctx.log, session_id, incarnation, "signal",
                                     key=msg.key, value=msg.value)
        if out.accepted:
            await conn.send(reply("ack", msg.id, seq=out.seq, duplicate=out.duplicate))
            continue
        await conn.send(reply("error", msg.id, status=out.status, error=out.error,
                              detail=out.detail))
        if out.deleted:
            ending.append(lambda: _finish(conn, follow.end("deleted")))
            return

