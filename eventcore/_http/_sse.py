"""``GET /v1/sessions/{id}/events``: SSE through the process's hub, or JSON pages.

Wire format (sse-starlette's encoder): ``id:`` the seq, ``event:`` the envelope type, ``data:``
the client envelope JSON. Each event is framed once and the bytes shared by every client of the
session. A ``: ping`` comment line every heartbeat interval, without the blank line that would
end an event (some clients, httpx-sse among them, dispatch an empty "message" on a blank line
once an id has been seen). Two events are not envelopes and carry
no ``id:``: ``stream.reset`` (history after the cursor is gone everywhere; ``data`` says where
the stream continues) and ``server.shutdown`` (with a ``retry:`` hint, right before the server
closes the stream while draining).

sse-starlette races the stream against the client's disconnect, the heartbeat and the server's
shutdown in one task group, and closes a client whose send blocks longer than the send timeout
(one that stopped reading). On shutdown the stream ends with ``server.shutdown``; the client
resumes with ``Last-Event-ID`` on any server.

A session that has ended and whose last event the client has seen answers 204, which tells an
``EventSource`` to stop reconnecting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Literal

import anyio
import msgspec
from fastapi import Depends, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import SessionNotFound
from ._context import SessionAccess, session_reader
from ._params import PageSize, SeqParam, parse_digits
from ._problems import Problem

if TYPE_CHECKING:
    from subscribers._hub import HubEvent

    from ._context import ServiceContext

__all__ = ["event_stream", "parse_types", "sse_frame"]

logger = logging.getLogger("eventcore.http")

RETRY_MS = 1000
_SEP = "\n"


def sse_frame(ev: HubEvent) -> bytes:
    """The event's SSE bytes, framed once per event and cached on it for every client."""
    frame = ev.sse
    if frame is None:
        frame = ev.sse = ServerSentEvent(
            data=ev.data.decode(), id=str(ev.seq), event=ev.type, sep=_SEP
        ).encode()
    return frame


def parse_types(raw: str | None) -> frozenset[str] | None:
    if raw is None or not raw.strip():
        return None
    types = frozenset(t.strip() for t in raw.split(",") if t.strip())
    if len(types) > 64 or any(len(t) > 128 or not t.isprintable() for t in types):
        raise Problem(422, "validation-error", "types: at most 64 comma-separated event types "
                      "of at most 128 printable characters")
    return types or None


def _parse_after(after: int | None, last_event_id: str | None) -> int:
    # The header wins: EventSource reconnects to the same URL (with its original ?after=) and
    # reports the last id it saw in Last-Event-ID.
    if last_event_id:
        try:
            return parse_digits(last_event_id, "Last-Event-ID")
        except ValueError as exc:
            raise Problem(400, "validation-error", f"{exc} (a seq)") from None
    return after or 0


class _Stream(EventSourceResponse):
    """sse-starlette's response with a cheaper send path: its per-send timeout costs a cancel
    scope per event per client; here each data send only stamps when it started, and the
    heartbeat task (which wakes at least every half send timeout) closes a client whose send has
    been pending longer than the timeout. Counts those closes instead of letting the timeout
    escape as a server error."""

    ctx: ServiceContext
    _pending_since: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self.ctx.metrics.sse_closed_slow.inc()
            logger.info("closed an SSE client that stopped reading")

    async def _stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        body = self.body_iterator
        assert isinstance(body, AsyncGenerator)
        try:
            async for chunk in body:
                self._pending_since = time.monotonic()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self._pending_since = None
        finally:
            # run the generator's cleanup (leave the hub) now, not at garbage collection
            with anyio.move_on_after(5, shield=True):
                await body.aclose()
        async with self._send_lock:
            self.active = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})

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
) -> Response:
    ctx = access.ctx
    start = _parse_after(after, last_event_id)
    wanted = parse_types(types)
    info = await ctx.log.get_session(access.session_id)  # 404 before anything streams
    if format == "json":
        return await _json_page(ctx, access.session_id, start, limit, wanted)
    if info.state == "ended" and start >= info.last_seq:
        return Response(status_code=204)
    if ctx.hub.closed or ctx.shutdown.is_set():
        raise Problem(503, "shutting-down", "resume on another server or shortly",
                      headers={"Retry-After": "1"})
    response = _Stream(
        _frames(ctx, access.session_id, start, wanted),
        shutdown_event=ctx.shutdown,
        shutdown_grace_period=2.0,
        ping=ctx.settings.sse_heartbeat_s,
        sep=_SEP,
        send_timeout=ctx.settings.sse_send_timeout_s,
        headers={"Cache-Control": "no-store"},
    )
    response.ctx = ctx
    return response


async def _frames(
    ctx: ServiceContext, session_id: str, after: int, types: frozenset[str] | None
) -> AsyncIterator[bytes]:
    from subscribers._hub import HubClosed, StreamReset

    metrics = ctx.metrics
    metrics.sse_clients.inc()
    cursor = after

    def sub_cursor() -> int:
        return cursor

    try:
        async with ctx.hub.subscribe(session_id, after, types=types) as sub:
            async for batch in sub.batches():
                if isinstance(batch, StreamReset):
                    yield ServerSentEvent(
                        data=msgspec.json.encode({"after": batch.after,
                                                  "first_available": batch.first_available}
                                                 ).decode(),
                        event="stream.reset", id=str(batch.resume_after), sep=_SEP,
                    ).encode()
                    continue
                yield b"".join([sse_frame(ev) for ev in batch])
                cursor = batch[-1].seq
                metrics.sse_events.inc(len(batch))
    except HubClosed:
        # Shutting down: tell the client to come back soon, from where it is. A named event
        # (not a bare retry field, which some clients surface as an empty "message").
        yield ServerSentEvent(
            data=msgspec.json.encode({"resume_after": sub_cursor(), "retry_ms": RETRY_MS}
                                     ).decode(),
            event="server.shutdown", retry=RETRY_MS, sep=_SEP,
        ).encode()
    except SessionNotFound:
        yield f": session deleted{_SEP}{_SEP}".encode()
    finally:
        metrics.sse_clients.dec()


async def _json_page(
    ctx: ServiceContext, session_id: str, after: int, limit: int,
    types: frozenset[str] | None,
) -> Response:
    events, _ = await ctx.hub.read_page(session_id, after, limit)
    next_after = events[-1].seq if events else after
    chosen = [e.data for e in events if types is None or e.type in types]
    body = b'{"events":[' + b",".join(chosen) + b'],"next_after":' + str(next_after).encode() + b"}"
    return Response(body, media_type="application/json")
