"""``GET /v1/sessions/{id}/events``: SSE through the process's hub, or JSON pages.

Wire format (sse-starlette's encoder): ``id:`` the seq, ``event:`` the envelope type, ``data:``
the client envelope JSON. Stream epochs: once a divergence was detected on the session (a
failover lost acknowledged appends; see README "Running on Redis Cluster") its events' ids are
``<seq>.<generation>``; before that (and on every session never touched by one) the id is the
bare seq, so the format is unchanged. ``Last-Event-ID`` (and ``?after=`` with ``?epoch=``) take
either; a bare seq means generation 0. A resume from an older epoch whose history may have been
rewritten past the cursor, or from beyond the tail, gets ``stream.reset`` with ``reason:
"diverged"``, the new ``epoch`` and ``resume_after``: discard what is held after it.
Each event is framed once and the bytes shared by every client of the
session. A ``: ping`` comment line every heartbeat interval, without the blank line that would
end an event (some clients, httpx-sse among them, dispatch an empty "message" on a blank line
once an id has been seen). Four events are not envelopes: ``stream.reset`` (history after
the cursor is gone everywhere, or was rewritten; ``data`` says where the stream continues) does
carry an ``id:``, the cursor to resume from (``<resume_after>`` or, on a divergence,
``<resume_after>.<epoch>``), so a reconnect after it does not repeat it. The other three carry
no ``id:`` (Last-Event-ID stays the last seq): ``server.shutdown`` (with a ``retry:`` hint,
right before the server closes the stream while draining), ``token.expired`` (the session
token that opened the stream has expired: the stream ends; the client reconnects with a fresh
token and ``Last-Event-ID``) and ``session.deleted`` (the incarnation the stream follows is
gone before the stream reached its ``session.ended``: the stream ends, never carrying an event
of a session created again under the id). ``data`` of those first two carries
``resume_after``, the last seq sent; of ``session.deleted``, ``last_seq`` and the
``incarnation`` deleted.

sse-starlette races the stream against the client's disconnect, the heartbeat and the server's
shutdown in one task group. A client whose send has been pending longer than the send timeout
(one that stopped reading) is disconnected at the transport (:mod:`._transport`): an ordinary
close would wait forever for its unsent bytes to drain. What a client holds is bounded by the
hub's ``buffer_bytes`` (one catch-up page or its live buffer), handed to the server in sends
of about ``_CHUNK_BYTES``. On shutdown the stream ends with ``server.shutdown``; the client
resumes with ``Last-Event-ID`` on any server.

Live, a caught-up stream skips all of that per event: the hub's fan-out hands the next
events to the stream's ``deliver`` (``Subscription.deliver_directly``), which writes their
shared frames, a batch joined into one write, straight to the connection's transport
(:func:`._transport.body_writer`: the bytes and chunk framing uvicorn's ``send`` would write
at once). It refuses whatever that path would not send at once (the write buffer over its
high-water mark, the token expired, the peer gone, a batch past ``_CHUNK_BYTES``), and the hub
refuses what is not the plain case (a gap, a new generation, ``session.ended``): those take
the buffered path above, unchanged. Pings, control events and the stream's end still go
through ``send``; the frames, ids and resume points are the same either way. A batch is
joined and chunk-framed once for every stream of the session that takes it whole (the
fan-out hands them the same list), and the sent-events counter is added to once per fan-out
round (``Hub.after_fan_out``), not per stream.

A session that has ended and whose last event the client has seen answers 204, which tells an
``EventSource`` to stop reconnecting.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Literal

import anyio
import msgspec
from fastapi import Depends, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from eventcore._follow import Event, Follower, closing_iter, divergence
from eventcore.errors import HistoryDiverged, HistoryGone

from .._clients import ClientFollow, StreamEnd, diverged_fields, is_generation, parse_epoch
from .._hub import Hub, Subscription
from ._context import SessionAccess, session_reader
from ._params import PageSize, SeqParam, parse_digits
from ._problems import Problem
from ._transport import BodyWriter, abort, body_writer, chunk

if TYPE_CHECKING:
    from prometheus_client import Counter

    from ._context import ServiceContext

__all__ = ["event_stream", "parse_types", "sse_frame"]

logger = logging.getLogger("eventcore.server")

RETRY_MS = 1000
_SEP = "\n"
# Frames go out in sends of about this size (one send per batch below it): the server copies
# each send whole into its write buffer, which is all a client that stopped reading then pins.
_CHUNK_BYTES = 64 * 1024


def sse_frame(ev: Event) -> bytes:
    """The event's SSE bytes, framed once per event and cached on it for every client."""
    return ev.framed(_frame)


def _frame(ev: Event) -> bytes:
    data, typ = ev.data, ev.type
    if (data.isascii() and b"\n" not in data and b"\r" not in data
            and "\n" not in typ and "\r" not in typ):
        # the common case, formatted directly: the bytes sse-starlette's encoder makes of it
        # (one line of data, nothing to drop; ASCII: valid UTF-8 as it is)
        return b"id: %b\nevent: %b\ndata: %b\n\n" % (
            _event_id(ev.seq, ev.generation).encode(), typ.encode(), data)
    frame: bytes = ServerSentEvent(data=data.decode(), id=_event_id(ev.seq, ev.generation),
                                   event=typ, sep=_SEP).encode()
    return frame


def _event_id(seq: int, generation: str) -> str:
    """``<seq>``, or ``<seq>.<generation>`` once the stream's epoch has one."""
    return f"{seq}.{generation}" if generation and generation != "0" else str(seq)


def parse_types(raw: str | None) -> frozenset[str] | None:
    if raw is None or not raw.strip():
        return None
    types = frozenset(t.strip() for t in raw.split(",") if t.strip())
    if len(types) > 64 or any(len(t) > 128 or not t.isprintable() for t in types):
        raise Problem(422, "validation-error", "types: at most 64 comma-separated event types "
                      "of at most 128 printable characters")
    return types or None


def _parse_after(after: int | None, last_event_id: str | None, epoch: str | None = None
                 ) -> tuple[int, str]:
    """The cursor and the generation of its epoch (``""``: 0)."""
    # The header wins: EventSource reconnects to the same URL (with its original ?after=) and
    # reports the last id it saw in Last-Event-ID.
    if last_event_id:
        seq, sep, gen = last_event_id.partition(".")
        try:
            cursor = parse_digits(seq, "Last-Event-ID")
            if sep and not is_generation(gen):
                # ids carry a generation only once it is not 0: 16 digits, as the server made it
                raise ValueError("Last-Event-ID's epoch must be the generation an id carried")
        except ValueError as exc:
            raise Problem(400, "validation-error", f"{exc} (a seq, or seq.epoch)") from None
        return cursor, gen
    try:
        return after or 0, parse_epoch(epoch)
    except ValueError:
        raise Problem(422, "validation-error",
                      "epoch: 0, or the 16-digit epoch a page said") from None


class _Progress:
    """The last seq sent to the client: where the control events tell it to resume. With the
    server's direct body writer (set by the response once called) and the stream's expiry."""

    __slots__ = ("cursor", "expires_at", "writer")

    def __init__(self, cursor: int, expires_at: float | None = None) -> None:
        self.cursor = cursor
        self.expires_at = expires_at
        self.writer: BodyWriter | None = None


class _Shared:
    """The direct path's state shared by a hub's streams: the chunk made of the last batch
    delivered (the fan-out hands the same list to every stream of the session that takes it
    whole; ``b""``: too big to go this way) and the deliveries not yet added to the counter
    (once per fan-out round)."""

    __slots__ = ("batch", "chunk", "counter", "sent")

    def __init__(self, counter: Counter) -> None:
        self.batch: list[Event] | None = None
        self.chunk = b""
        self.counter = counter
        self.sent = 0

    def flush(self) -> None:
        if self.sent:
            n, self.sent = self.sent, 0
            self.counter.inc(n)


_shared: weakref.WeakKeyDictionary[Hub, _Shared] = weakref.WeakKeyDictionary()


def _shared_of(ctx: ServiceContext) -> _Shared:
    shared = _shared.get(ctx.hub)
    if shared is None:
        shared = _shared[ctx.hub] = _Shared(ctx.metrics.sse_events)
        ctx.hub.after_fan_out(shared.flush)
    return shared


class _Stream(EventSourceResponse):
    """sse-starlette's response with a cheaper send path: its per-send timeout costs a cancel
    scope per event per client; here each data send only stamps when it started, and the
    heartbeat task (which wakes at least every half send timeout) gives up on a client whose
    send has been pending longer than the timeout. Such a client is counted and its connection
    aborted instead of the timeout escaping as a server error.

    With ``expires_at`` (a session token's ``exp``, Unix seconds) the stream ends then with
    ``token.expired``: one cancel scope for the stream's life, around reading and sending."""

    ctx: ServiceContext
    progress: _Progress
    expires_at: float | None = None
    _pending_since: float | None = None
    _body_send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self._body_send = scope.get("eventcore.body_send")
            self.progress.writer = body_writer(scope)
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self.ctx.metrics.sse_closed_slow.inc()
            if abort(scope):
                # Let the server see the connection lost before this returns, or it reports
                # a response the app left incomplete.
                with anyio.move_on_after(1):
                    while (await receive())["type"] != "http.disconnect":
                        pass
                logger.info("disconnected an SSE client that stopped reading")
            else:
                logger.warning("an SSE client stopped reading, and this server offers no way "
                               "to abort its connection: closing it normally")

    async def _send_body(self, send: Send, body: bytes, *, more: bool) -> None:
        self._pending_since = time.monotonic()
        # the body past the per-message wrappers between here and the server (the edge
        # middleware's, the exception handlers'): they act on the response start only
        await (self._body_send or send)({"type": "http.response.body", "body": body,
                                         "more_body": more})
        self._pending_since = None

    async def _stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        body = self.body_iterator
        assert isinstance(body, AsyncGenerator)
        deadline = math.inf
        if self.expires_at is not None:
            deadline = anyio.current_time() + max(0.0, self.expires_at - time.time())
        last = b""
        try:
            # Cancelled mid-send, nothing of the chunk was written (the server writes a message
            # whole once its buffer has room) and the generator, not resumed, has not counted it.
            with anyio.CancelScope(deadline=deadline) as expiry:
                async for chunk in body:
                    await self._send_body(send, chunk, more=True)
            if expiry.cancelled_caught:
                last = _control("token.expired", self.progress.cursor,
                                detail="the session token has expired: reconnect with a fresh "
                                "token and Last-Event-ID to resume")
        finally:
            # run the generator's cleanup (leave the hub) now, not at garbage collection
            with anyio.move_on_after(5, shield=True):
                await body.aclose()
        async with self._send_lock:
            self.active = False
            await self._send_body(send, last, more=False)

    async def _ping(self, send: Send) -> None:
        timeout = self.send_timeout or math.inf
        tick = min(self.ping_interval, timeout / 2)
        last_ping = time.monotonic()
        while self.active:
            await anyio.sleep(tick)
            now = time.monotonic()
            pending = self._pending_since
            if pending is not None and now - pending > timeout:
                raise SendTimeoutError()
            if now - last_ping >= self.ping_interval:
                last_ping = now
                async with self._send_lock:
                    if self.active:
                        await self._send_with_timeout(
                            send, {"type": "http.response.body", "body": b": ping\n",
                                   "more_body": True})


async def event_stream(
    access: Annotated[SessionAccess, Depends(session_reader)],
    after: Annotated[SeqParam | None, Query(description="Resume after this seq")] = None,
    types: Annotated[str | None, Query(max_length=8192,
                                       description="Comma-separated event types")] = None,
    format: Annotated[Literal["sse", "json"], Query()] = "sse",
    limit: Annotated[PageSize, Query(description="format=json page size")] = 100,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    epoch: Annotated[str | None, Query(max_length=20, description="The stream epoch of "
                                       "`after` (what `epoch` in a JSON page said)")] = None,
) -> Response:
    ctx = access.ctx
    start, generation = _parse_after(after, last_event_id, epoch)
    wanted = parse_types(types)
    info = await ctx.log.get_session(access.session_id)  # 404 before anything streams
    # a token holder's incarnation was checked; the session may have been re-created since,
    # and then the stream ends at once
    incarnation = info.incarnation if access.principal.admin else access.principal.incarnation
    if format == "json":
        return await _json_page(ctx, access.session_id, incarnation, start, generation, limit,
                                wanted)
    if info.state == "ended" and start == info.last_seq and not generation:
        return Response(status_code=204)
    if ctx.hub.closed or ctx.shutdown.is_set():
        raise Problem(503, "shutting-down", "resume on another server or shortly",
                      headers={"Retry-After": "1"})
    progress = _Progress(start, access.principal.expires_at)
    response = _Stream(
        _frames(ctx, access.session_id, incarnation, progress, wanted, generation),
        shutdown_event=ctx.shutdown,
        shutdown_grace_period=2.0,
        ping=ctx.settings.sse_heartbeat_s,
        sep=_SEP,
        send_timeout=ctx.settings.sse_send_timeout_s,
        headers={"Cache-Control": "no-store"},
    )
    response.ctx = ctx
    response.progress = progress
    response.expires_at = access.principal.expires_at  # None for the API key: no expiry
    return response


def _control(event: str, resume_after: int, *, retry: int | None = None, **data: object
             ) -> bytes:
    """A control event (not an envelope: no ``id:``, so Last-Event-ID stays the last seq)."""
    return ServerSentEvent(
        data=msgspec.json.encode({"resume_after": resume_after, **data}).decode(),
        event=event, retry=retry, sep=_SEP,
    ).encode()


async def _frames(
    ctx: ServiceContext, session_id: str, incarnation: str, progress: _Progress,
    types: frozenset[str] | None, generation: str = "",
) -> AsyncIterator[bytes]:

    metrics = ctx.metrics
    metrics.sse_clients.inc()
    shared = _shared_of(ctx)

    def deliver(events: list[Event]) -> bool:
        # The live fast path (Subscription.deliver_directly): the hub's fan-out writes the
        # session's shared frames straight to the connection, the batch joined in one write,
        # when that is what the path below would send at once; anything else (token expired,
        # write buffer full, past a chunk) is refused and goes the ordinary way.
        writer = progress.writer
        if writer is None or (progress.expires_at is not None
                              and time.time() >= progress.expires_at):
            return False
        if events is shared.batch:
            framed = shared.chunk  # this batch's bytes, made for another stream of it
        else:
            if len(events) == 1:
                body = sse_frame(events[0])
            else:
                body = b"".join([sse_frame(ev) for ev in events])
            framed = b"" if len(events) > 1 and len(body) > _CHUNK_BYTES else chunk(body)
            shared.batch, shared.chunk = events, framed
        if not framed or not writer(framed):
            return False
        progress.cursor = follow.sent = events[-1].seq
        shared.sent += len(events)
        return True

    def direct(follower: Follower) -> None:
        if progress.writer is not None and isinstance(follower, Subscription):
            follower.deliver_directly(deliver)

    follow = ClientFollow(ctx.hub, session_id, progress.cursor, incarnation=incarnation,
                          types=types, generation=generation, on_follower=direct)
    try:
        async with closing_iter(follow.items()) as items:
            async for item in items:
                # progress moves once the consumer asks for more: the frame has been sent
                if isinstance(item, StreamEnd):
                    end = _end_frame(item, progress.cursor)
                    if end is not None:
                        yield end
                    return
                if isinstance(item, HistoryDiverged):
                    yield ServerSentEvent(
                        data=msgspec.json.encode(_reset(item)).decode(),
                        event="stream.reset", id=_event_id(item.resume_after, item.epoch),
                        sep=_SEP,
                    ).encode()
                    progress.cursor = follow.sent = item.resume_after
                    info = await ctx.log.get_session(session_id)
                    if info.state == "ended" and item.resume_after >= info.last_seq:
                        return  # reset to the end of an ended session: nothing follows
                    continue
                if isinstance(item, HistoryGone):
                    yield ServerSentEvent(
                        data=msgspec.json.encode({"after": item.after,
                                                  "first_available": item.first_available}
                                                 ).decode(),
                        event="stream.reset", id=str(item.resume_after), sep=_SEP,
                    ).encode()
                    progress.cursor = follow.sent = item.resume_after
                    continue
                parts: list[bytes] = []
                size = 0
                for i, ev in enumerate(item):
                    frame = sse_frame(ev)
                    parts.append(frame)
                    size += len(frame)
                    if size >= _CHUNK_BYTES or i == len(item) - 1:
                        yield b"".join(parts)
                        progress.cursor = follow.sent = ev.seq
                        metrics.sse_events.inc(len(parts))
                        parts, size = [], 0
    finally:
        metrics.sse_clients.dec()


def _end_frame(end: StreamEnd, cursor: int) -> bytes | None:
    if end.reason == "shutdown":
        # Shutting down: tell the client to come back soon, from where it is. A named event
        # (not a bare retry field, which some clients surface as an empty "message").
        return _control("server.shutdown", cursor, retry=RETRY_MS, retry_ms=RETRY_MS)
    if end.reason == "deleted":
        # Deleted (or expired) before the stream reached its end. Not resumable: the id may
        # name another session now, which the client must open afresh.
        return ServerSentEvent(
            data=msgspec.json.encode({"last_seq": cursor,
                                      "incarnation": end.incarnation}).decode(),
            event="session.deleted", sep=_SEP,
        ).encode()
    if end.error is not None:
        raise end.error  # Redis gone past the retry budget...: the stream fails, as before
    return None


_reset = diverged_fields  # what ``stream.reset`` (SSE) and ``reset`` (JSON) say


async def _json_page(
    ctx: ServiceContext, session_id: str, incarnation: str, after: int, generation: str,
    limit: int, types: frozenset[str] | None,
) -> Response:
    # a page of the incarnation the caller opened (404 if it went meanwhile), never the next
    try:
        events, _ = await ctx.hub.read_page(session_id, after, limit, incarnation=incarnation,
                                            generation=generation)
    except HistoryDiverged as exc:
        return _json_reset(exc)
    for ev in events:
        if ev.generation != generation:
            changed = divergence(session_id, after, generation, ev)
            if isinstance(changed, HistoryDiverged):
                return _json_reset(changed)
            if changed is not None:
                generation = changed
    next_after = events[-1].seq if events else after
    chosen = [e.data for e in events if types is None or e.type in types]
    body = (b'{"events":[' + b",".join(chosen) + b'],"next_after":' + str(next_after).encode()
            + b',"epoch":"' + (generation or "0").encode() + b'"}')
    return Response(body, media_type="application/json")


def _json_reset(gone: HistoryDiverged) -> Response:
    """A JSON page that tells the reader its history diverged: no events, where to resume
    (``next_after``) and in which ``epoch``."""
    return Response(msgspec.json.encode({
        "events": [], "next_after": gone.resume_after, "epoch": gone.epoch,
        "reset": _reset(gone)}), media_type="application/json")
