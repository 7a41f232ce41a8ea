"""The edge, as one pure ASGI middleware (no per-request task, streaming untouched):

- request headers past 32 KiB in total are refused with 431;
- request bodies are counted while they stream in and refused with 413 past the limit, before
  the application sees a byte (``Content-Length`` is used only to refuse early, never trusted);
- safety headers on every response (``Referrer-Policy: no-referrer`` keeps URL tokens out of
  Referer headers);
- request metrics by route template (never by raw path: ids would explode the label set).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eventcore.errors import EventcoreError

from ._problems import problem_response

__all__ = ["EdgeMiddleware"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SAFETY_HEADERS = [
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]

MAX_HEADER_BYTES = 32 * 1024

Observe = Callable[[str, str, int, float, bool], None]


# How much of a refused body is read (and dropped) so the client, which sends its whole body
# before reading, sees the 413 instead of a reset connection. Past it the connection is closed.
DRAIN_LIMIT = 8 * 1024 * 1024


class _TooLarge(EventcoreError):
    def __init__(self, pending: bool) -> None:
        self.pending = pending  # more of the body is still on its way


class EdgeMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body: Callable[[], int], observe: Observe | None = None
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        streaming = False

        async def send_wrapped(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [h for h in _SAFETY_HEADERS if h[0] not in names]
                streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in headers)
                message = {**message, "headers": headers}
            await send(message)

        try:
            if sum(len(k) + len(v) for k, v in scope.get("headers", ())) > MAX_HEADER_BYTES:
                # the server may have taken them in one read, past its own incremental limit
                response = problem_response(431, "headers-too-large",
                                            f"request headers are limited to {MAX_HEADER_BYTES}"
                                            " bytes", headers={"Connection": "close"})
                await response(scope, receive, send_wrapped)
                return
            if scope["method"] in _BODY_METHODS:
                try:
                    receive = await self._buffer_body(scope, receive)
                except _TooLarge as exc:
                    await self._refuse(receive, send_wrapped, exc.pending)
                    return
            # a streaming response sends its body (once started) past the wrappers inside
            scope["eventcore.body_send"] = send
            await self.app(scope, receive, send_wrapped)
        finally:
            if self.observe is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self.observe(scope["method"], template, status,
                             time.perf_counter() - started, streaming)

    async def _refuse(self, receive: Receive, send: Send, pending: bool) -> None:
        """413 before the application runs: headers first, then the rest of the body is
        drained (bounded), then the problem document."""
        response = problem_response(
            413, "payload-too-large", f"request bodies are limited to {self.max_body()} bytes",
            headers={"Connection": "close"},
        )
        await send({"type": "http.response.start", "status": 413,
                    "headers": response.raw_headers})
        drained = 0
        while pending and drained < DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            pending = message.get("more_body", False)
        await send({"type": "http.response.body", "body": response.body, "more_body": False})

    async def _buffer_body(self, scope: Scope, receive: Receive) -> Receive:
        limit = self.max_body()
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    raise _TooLarge(pending=declared <= DRAIN_LIMIT)
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # a disconnect: hand it to the app as is
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise _TooLarge(pending=message.get("more_body", False))
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Any] = [first] if first is not None else [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replayed() -> Message:
            if replay:
                msg: Message = replay.pop()
                return msg
            return await receive()  # later calls see the real disconnect

        return replayed
