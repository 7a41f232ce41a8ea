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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

__all__ = ["ABORT_EXTENSION", "AbortableApp", "abort"]

ABORT_EXTENSION = "eventcore.transport.abort"


def _transport_abort(send: Send) -> Callable[[], None] | None:
    transport: Any = getattr(getattr(send, "__self__", None), "transport", None)
    fn = getattr(transport, "abort", None)
    return fn if callable(fn) else None


def abort(scope: Scope) -> bool:
    """Reset the request's connection now, dropping whatever is unsent; False if the server
    offered no way to."""
    fn = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
    if fn is None:
        return False
    fn()
    return True


class AbortableApp(FastAPI):
    """FastAPI whose HTTP requests and WebSockets carry their transport's ``abort`` (see the
    module doc)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            fn = _transport_abort(send)
            if fn is not None:
                scope["extensions"] = {**(scope.get("extensions") or {}), ABORT_EXTENSION: fn}
        await super().__call__(scope, receive, send)
