"""``POST /v1/telephony/start`` and ``GET /v1/telephony/ws``: a phone call's media stream as a
session (the README's "Telephony" section is the user-facing description).

``/start`` (API key) creates the session and signs a per-call token (the session tokens'
secret, audience ``eventcore:telephony``: never accepted as a session token, nor a session
token as it) into the ``wss://.../v1/telephony/ws?token=...`` URL to give the provider.

On the socket, the first one or two text messages say which provider is calling (each
provider's documented ``connected`` / ``start`` shapes; exactly one framing must recognise
them). Then, through the one input path (:func:`eventcore.server._clients.client_input`):

- the call's ``start`` → an input ``{"telephony": "start", "provider", "encoding",
  "sample_rate", "custom"}`` whose ``server_data`` holds the provider's call, stream and
  account ids;
- audio frames → inputs ``{"telephony": "audio", "audio": base64, "bytes", "frames",
  "first_chunk", "timestamp_ms"}``, **batched**: one entry per ``batch_ms`` of audio (200 ms
  by default: ten 20 ms frames), flushed early before any other event so the order holds.
  ``audio="frame"`` makes one entry per frame; ``"off"`` records none;
- DTMF → ``{"telephony": "dtmf", "digit"}``; a played mark → ``{"telephony": "mark", "name"}``;
- ``stop``, or the socket closing without one → ``{"telephony": "stop", "reason"}``.

Every entry's event key is derived from a digest of the provider's stream id (and its chunk or
sequence numbers), so a resent message is a duplicate. The session's own events after the
call's start go back to the provider, translated by its framing: ``telephony.play``
(``{"audio": base64}`` in the stream's format), ``telephony.mark`` (``{"name"}``),
``telephony.clear``, ``telephony.hangup`` and ``session.ended`` (both close the media
stream). They are followed with :class:`~eventcore.server._clients.ClientFollow` (the hub, as
SSE and WebSockets do).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
from typing import Annotated, Any, Literal

import anyio
import msgspec
from fastapi import APIRouter, Depends, Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field

from eventcore._follow import closing_iter
from eventcore.errors import EventcoreError, HistoryGone

from .._clients import ClientFollow, InputOutcome, StreamEnd, client_input
from .._http._auth import Principal
from .._http._context import ServiceContext, get_context, require_admin
from .._http._problems import Problem
from .._http._ws import WsClosed, WsConn
from ._exotel import EXOTEL
from ._framing import CallStart, Dtmf, Framing, MarkPlayed, Media, Stop
from ._plivo import PLIVO
from ._telnyx import TELNYX
from ._twilio import TWILIO

__all__ = ["FRAMINGS", "OUTPUT_TYPES", "detect", "router"]

logger = logging.getLogger("eventcore.telephony")

AUDIENCE = "eventcore:telephony"
FRAMINGS: dict[str, Framing] = {f.name: f for f in (TWILIO, TELNYX, PLIVO, EXOTEL)}
OUTPUT_TYPES = frozenset({"telephony.play", "telephony.mark", "telephony.clear",
                          "telephony.hangup", "session.ended"})
MAX_MESSAGE_BYTES = 256 * 1024
HANDSHAKE_TIMEOUT_S = 10.0

CLOSE = {"normal": 1000, "binary": 1003, "invalid": 1007, "unavailable": 1011,
         "restarting": 1012, "starting": 1013, "unknown_handshake": 4400, "unauthorized": 4401,
         "not_found": 4404, "handshake_timeout": 4408, "session_ended": 4409}

Provider = Literal["twilio", "telnyx", "plivo", "exotel"]
AudioMode = Literal["batch", "frame", "off"]


class StartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, max_length=128)
    metadata: dict[str, str] | None = None
    input: Any = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=512)
    ttl_s: int | None = Field(default=None, ge=1)
    provider: Provider | None = Field(default=None, description="Refuse other providers")
    audio: AudioMode = "batch"
    batch_ms: int = Field(default=200, ge=20, le=5000)
    token_ttl_s: int = Field(default=3600, ge=10, le=24 * 3600)
    public_url: str | None = Field(
        default=None, max_length=512, pattern=r"^wss?://[^\s?#]+$",
        description="The ws(s):// base the provider reaches this API at (default: this "
        "request's host, ws:// for http and wss:// for https)")


class StartOut(BaseModel):
    session_id: str
    incarnation: str
    url: str = Field(description="Give this to the provider as its media stream URL")
    expires_in: int


router = APIRouter(tags=["telephony"])


@router.post("/v1/telephony/start", response_model=StartOut,
             summary="Create a session for a phone call and the media stream URL to give "
             "the provider")
async def telephony_start(
    body: StartIn, request: Request, _: Annotated[Principal, Depends(require_admin)],
    ctx: Annotated[ServiceContext, Depends(get_context)],
) -> StartOut:
    if ctx.agents is not None and body.agent not in ctx.agents:
        raise Problem(422, "unknown-agent", f"no agent named {body.agent!r} is registered")
    info = await ctx.log.create_session(body.agent, labels=body.metadata, input=body.input,
                                        ttl_s=body.ttl_s, idempotency_key=body.idempotency_key)
    token = ctx.auth.sign({"sid": info.session_id, "inc": info.incarnation,
                           "provider": body.provider, "audio": body.audio,
                           "batch_ms": body.batch_ms}, audience=AUDIENCE,
                          ttl_s=body.token_ttl_s)
    base = body.public_url
    if base is None:
        http = str(request.base_url).rstrip("/")
        base = "wss" + http[5:] if http.startswith("https") else "ws" + http[4:]
    return StartOut(session_id=info.session_id, incarnation=info.incarnation,
                    url=f"{base.rstrip('/')}/v1/telephony/ws?token={token}",
                    expires_in=body.token_ttl_s)


def detect(first: dict[str, Any], second: dict[str, Any] | None
           ) -> tuple[Framing, CallStart] | None:
    """The one framing that recognises this handshake, and the call; ``None`` if none or more
    than one does."""
    found = [(f, s) for f in FRAMINGS.values() if (s := f.detect(first, second)) is not None]
    return found[0] if len(found) == 1 else None


class _Refused(EventcoreError):
    def __init__(self, why: str, reason: str) -> None:
        super().__init__(reason)
        self.why = why
        self.reason = reason


_object = msgspec.json.Decoder(dict[str, Any])


async def _message(conn: WsConn) -> dict[str, Any]:
    raw = await conn.receive_text()
    try:
        return _object.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        raise _Refused("invalid", "not a JSON object") from None


@router.websocket("/v1/telephony/ws")
async def telephony_socket(websocket: WebSocket) -> None:
    """A provider's media stream (see the module doc)."""
    ctx: ServiceContext | None = getattr(websocket.app.state, "eventcore", None)
    conn = WsConn(websocket, send_timeout_s=ctx.settings.sse_send_timeout_s if ctx else 5.0,
                  max_message_bytes=MAX_MESSAGE_BYTES)
    await websocket.accept()
    if ctx is None:
        await conn.close(CLOSE["starting"], "the service is starting: retry shortly")
        return
    try:
        await _call(ctx, conn, websocket.query_params.get("token") or "")
    except _Refused as exc:
        await conn.close(CLOSE[exc.why], exc.reason)
    except WsClosed:
        pass


async def _call(ctx: ServiceContext, conn: WsConn, token: str) -> None:
    try:
        claims = ctx.auth.verify_signed(token, audience=AUDIENCE)
    except Problem as exc:
        raise _Refused("unauthorized", f"telephony token: {exc.detail}") from None
    sid, inc = claims.get("sid"), claims.get("inc")
    if not isinstance(sid, str) or not isinstance(inc, str):
        raise _Refused("unauthorized", "telephony token: malformed claims")
    mode: AudioMode = claims.get("audio") if claims.get("audio") in ("frame", "off") \
        else "batch"  # type: ignore[assignment]
    batch_ms = claims.get("batch_ms")
    batch_ms = batch_ms if isinstance(batch_ms, int) and 20 <= batch_ms <= 5000 else 200
    framing, start = await _handshake(conn, claims.get("provider"))
    stream = start.stream_id
    started = await client_input(
        ctx.log, sid, inc, "input",
        payload={"telephony": "start", "provider": start.provider, "encoding": start.encoding,
                 "sample_rate": start.sample_rate, "custom": start.custom},
        idempotency_key=f"telephony:{_tag(stream)}:start", server_data=start.server_data())
    _check(started)
    logger.info("telephony %s call on session %s (stream %s)", start.provider, sid, stream)
    follow = ClientFollow(ctx.hub, sid, started.seq, incarnation=inc, types=OUTPUT_TYPES)
    call = _Call(ctx, conn, framing, start, sid, inc, mode, batch_ms)
    # The token must be valid when the provider connects (or reconnects); a call in progress
    # is not cut at its expiry.
    async with anyio.create_task_group() as tg:

        async def inbound() -> None:
            await call.inbound()
            tg.cancel_scope.cancel()

        tg.start_soon(inbound)
        await call.outbound(follow)
        tg.cancel_scope.cancel()
    with anyio.CancelScope(shield=True):
        await call.finish()


async def _handshake(conn: WsConn, wanted: object) -> tuple[Framing, CallStart]:
    second: dict[str, Any] | None = None
    with anyio.move_on_after(HANDSHAKE_TIMEOUT_S) as waited:
        first = await _message(conn)
        if first.get("event") == "connected":
            second = await _message(conn)
    if waited.cancelled_caught:
        raise _Refused("handshake_timeout", "no start message in "
                       f"{HANDSHAKE_TIMEOUT_S:g}s")
    found = detect(first, second)
    if found is None:
        shown = str(first.get("event"))[:20] if second is None else \
            f"{str(first.get('event'))[:20]}, {str(second.get('event'))[:20]}"
        raise _Refused("unknown_handshake", f"unknown handshake ({shown}): expected the "
                       "connected/start of twilio, telnyx, plivo or exotel")
    if wanted is not None and found[0].name != wanted:
        raise _Refused("unknown_handshake", f"this call expects {wanted}, not "
                       f"{found[0].name}")
    return found


def _check(out: InputOutcome) -> None:
    if out.accepted:
        return
    if out.deleted or out.status == 404:
        raise _Refused("not_found", "the session is gone")
    if out.status == 409:
        raise _Refused("session_ended", "the session has ended")
    raise _Refused("unavailable", out.detail or out.error)


class _Call:
    """One connected media stream: provider messages in, the session's output out."""

    def __init__(self, ctx: ServiceContext, conn: WsConn, framing: Framing, start: CallStart,
                 session_id: str, incarnation: str, mode: AudioMode, batch_ms: int) -> None:
        self.ctx = ctx
        self.conn = conn
        self.framing = framing
        self.start = start
        self.session_id = session_id
        self.incarnation = incarnation
        self.mode = mode
        self.batch_bytes = max(1, start.bytes_per_second * batch_ms // 1000)
        self.audio: list[Media] = []
        self.audio_size = 0
        self.count = 0
        self.stopped: str | None = None
        self.close_code = CLOSE["normal"]
        self.close_reason = "the call ended"

    async def _append(self, payload: dict[str, Any], key: str) -> None:
        out = await client_input(
            self.ctx.log, self.session_id, self.incarnation, "input", payload=payload,
            idempotency_key=f"telephony:{_tag(self.start.stream_id)}:{key}",
            server_data={"telephony": {"stream_id": self.start.stream_id}})
        _check(out)

    async def flush(self) -> None:
        if not self.audio:
            return
        frames, self.audio, self.audio_size = self.audio, [], 0
        first = frames[0]
        self.count += 1
        key = f"audio:{first.chunk}" if first.chunk is not None else f"audio#{self.count}"
        await self._append({"telephony": "audio", "frames": len(frames),
                            "bytes": sum(len(f.audio) for f in frames),
                            "first_chunk": first.chunk, "timestamp_ms": first.timestamp_ms,
                            "audio": base64.b64encode(b"".join(f.audio for f in frames)
                                                      ).decode()}, key)

    async def inbound(self) -> None:
        try:
            while True:
                msg = await _message(self.conn)
                item = self.framing.read(msg)
                if item is None:
                    continue
                if isinstance(item, Media):
                    if self.mode == "off":
                        continue
                    self.audio.append(item)
                    self.audio_size += len(item.audio)
                    if self.mode == "frame" or self.audio_size >= self.batch_bytes:
                        await self.flush()
                    continue
                await self.flush()
                self.count += 1
                seq = msg.get("sequenceNumber", msg.get("sequence_number"))
                key = f"#{seq}" if isinstance(seq, int | str) and str(seq).isdigit() \
                    else f"n{self.count}"
                if isinstance(item, Dtmf):
                    await self._append({"telephony": "dtmf", "digit": item.digit}, f"dtmf{key}")
                elif isinstance(item, MarkPlayed):
                    await self._append({"telephony": "mark", "name": item.name}, f"mark{key}")
                elif isinstance(item, Stop):
                    self.stopped = item.reason
                    return
        except _Refused as exc:
            self.close_code, self.close_reason = CLOSE[exc.why], exc.reason
        except WsClosed:
            pass

    async def outbound(self, follow: ClientFollow) -> None:
        send = self.conn.send
        with contextlib.suppress(WsClosed):
            async with closing_iter(follow.items()) as items:
                async for item in items:
                    if isinstance(item, StreamEnd):
                        self._ended(item)
                        return
                    if isinstance(item, HistoryGone):
                        continue
                    for ev in item:
                        follow.sent = ev.seq
                        payload = _payload(ev.data)
                        if ev.type == "telephony.play":
                            audio = payload.get("audio")
                            if isinstance(audio, str) and audio:
                                await send(_encode(self.framing.play(self.start, audio)))
                        elif ev.type == "telephony.mark":
                            name = payload.get("name")
                            if isinstance(name, str) and name:
                                await send(_encode(self.framing.mark(self.start, name)))
                        elif ev.type == "telephony.clear":
                            await send(_encode(self.framing.clear(self.start)))
                        else:  # telephony.hangup, session.ended
                            self.close_reason = "hangup" if ev.type == "telephony.hangup" \
                                else "the session ended"
                            self.stopped = self.stopped or "hangup"
                            return

    def _ended(self, end: StreamEnd) -> None:
        if end.reason == "deleted":
            self.close_code, self.close_reason = CLOSE["not_found"], "the session was deleted"
        elif end.reason == "shutdown":
            self.close_code, self.close_reason = CLOSE["restarting"], "the server is restarting"
        elif end.reason == "error":
            self.close_code, self.close_reason = CLOSE["unavailable"], "the log is unavailable"

    async def finish(self) -> None:
        """Record what is left (audio, the stop) and close the socket."""
        with contextlib.suppress(_Refused):
            await self.flush()
            reason = self.stopped or ("socket_closed" if self.conn.closed is not None
                                      else "server_closed")
            await self._append({"telephony": "stop", "reason": reason}, "stop")
        await self.conn.close(self.close_code, self.close_reason)


def _tag(stream_id: str) -> str:
    """The stream's part of an event key: a digest, as clients see event keys and the
    provider's ids are server data only."""
    return hashlib.sha256(stream_id.encode()).hexdigest()[:24]


def _payload(data: bytes) -> dict[str, Any]:
    try:
        env = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    payload = env.get("payload") if isinstance(env, dict) else None
    return payload if isinstance(payload, dict) else {}


def _encode(msg: dict[str, Any]) -> str:
    return msgspec.json.encode(msg).decode()
