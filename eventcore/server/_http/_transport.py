"""Dropping a connection at the transport, which ASGI has no message for.

A response that gives up on a client that stopped reading cannot just return: uvicorn then
calls ``transport.close()``, and an asyncio (or uvloop) transport closes only once its write
buffer has drained, which never happens for a peer that never reads. The socket stays
ESTABLISHED, its unsent bytes held in user space and the kernel, for as long as the peer keeps
it open. ``transport.abort()`` discards the buffer and resets the connection.

The ASGI send callable uvicorn hands the app is a bound method of its per-request cycle, which
holds the transport. :class:`AbortableApp` (the app's outermost layer, where ``send`` is still
the server's own) puts the transport's ``abort`` in ``scope["extensions"]`` for the request;
under a server that offers no transport, :func:`abort` says so and the caller falls back to an
ordinary close.

:func:`body_writer` is the live SSE stream's way past ASGI ``send`` (see ``_sse.py``): a plain
function that writes a body chunk straight to the connection's transport, framed as the
server frames it (:func:`chunk`: done once by the caller, so the bytes of a batch shared by
many streams are framed once for all of them), when that is exactly what ``send`` would do
at once; it refuses (returns
False, writing nothing) otherwise: write buffer over its high-water mark, response not
started or complete, peer gone. Offered under uvicorn's httptools protocol only (whose
``send`` is, for a started body, a plain ``transport.write``); elsewhere the stream keeps to
``send``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

__all__ = ["ABORT_EXTENSION", "WRITE_EXTENSION", "AbortableApp", "BodyWriter", "abort",
           "body_writer", "chunk"]

ABORT_EXTENSION = "eventcore.transport.abort"
WRITE_EXTENSION = "eventcore.transport.write"

BodyWriter = Callable[[bytes], bool]
"""Write one body chunk (:func:`chunk`'s framing of non-empty bytes) now, or refuse (False,
nothing written)."""

_HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"


def chunk(body: bytes) -> bytes:
    """``body`` (not empty) framed as one chunk of a chunked body, as uvicorn frames a send."""
    return b"%x\r\n%b\r\n" % (len(body), body)


def _body_writer(send: Send) -> BodyWriter | None:
    cycle: Any = getattr(send, "__self__", None)
    if cycle is None or type(cycle).__module__ != _HTTPTOOLS_CYCLE or not all(
        hasattr(cycle, a) for a in ("transport", "flow", "chunked_encoding", "disconnected",
                                    "response_started", "response_complete", "scope")
    ):
        return None
    transport = cycle.transport
    flow = cycle.flow

    def write(framed: bytes) -> bool:
        # what the cycle's send does for a started chunked body with more to come, when it
        # would not first wait for the write buffer to drain (a Content-Length body is no
        # stream: left to send)
        if (flow.write_paused or cycle.disconnected or not cycle.response_started
                or cycle.response_complete or cycle.chunked_encoding is not True
                or transport.is_closing()):
            return False
        transport.write(framed)
        return True

    return write


def _transport_abort(send: Send) -> Callable[[], None] | None:
    transport: Any = getattr(getattr(send, "__self__", None), "transport", None)
    fn = getattr(transport, "abort", None)
    return fn if callable(fn) else None


def body_writer(scope: Scope) -> BodyWriter | None:
    """The request's direct body writer (module doc), None if the server offers none."""
    send = (scope.get("extensions") or {}).get(WRITE_EXTENSION)
    return None if send is None else _body_writer(send)


def abort(scope: Scope) -> bool:
    """Reset the request's connection now, dropping whatever is unsent; False if the server
    offered no way to."""
    fn = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
    if fn is None:
        return False
    fn()
    return True


class AbortableApp(FastAPI):
    """FastAPI whose HTTP requests and WebSockets carry their transport's ``abort``, and HTTP
    requests its :func:`body_writer` (see the module doc)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            ext = dict(scope.get("extensions") or {})
            fn = _transport_abort(send)
            if fn is not None:
                ext[ABORT_EXTENSION] = fn
            if scope["type"] == "http":
                ext[WRITE_EXTENSION] = send  # the server's own send: body_writer() looks in it
            scope["extensions"] = ext
        await super().__call__(scope, receive, send)
