"""The real HTTP service for tests: ``create_app`` served by uvicorn in this process, on a socket
bound and listening before the server starts (so no request can race its startup).

Used by tests/webrtc, tests/ui and tests/cli (``eventcore tail --url``)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI

from eventcore import EventLog
from eventcore.server._http import ServiceContext, ServiceFactory, create_app, uvicorn_config
from eventcore.server._ui import ui_router
from eventcore.server._webrtc import WebRTCGateway
from eventcore.server._webrtc_http import webrtc_router, webrtc_service


@dataclass
class Service:
    url: str
    port: int
    api_key: str
    app: FastAPI
    log: EventLog
    server: uvicorn.Server

    @property
    def ctx(self) -> ServiceContext:
        ctx: ServiceContext = self.app.state.eventcore
        return ctx

    @property
    def gateway(self) -> WebRTCGateway:
        gw = self.ctx.extras["webrtc"]
        assert isinstance(gw, WebRTCGateway)
        return gw

    def client(self, credential: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)

    async def create_session(self, agent: str = "echo") -> tuple[str, str]:
        """A new session's id and read-write token."""
        async with self.client(self.api_key) as c:
            r = await c.post("/v1/sessions", json={"agent": agent})
            assert r.status_code == 201, r.text
            body = r.json()
            return body["session_id"], body["token"]


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(256)
    return sock


@contextlib.asynccontextmanager
async def serve(
    log: EventLog, *, port: int = 0,
    services: Sequence[ServiceFactory] = (webrtc_service,), **app_kwargs: Any,
) -> AsyncIterator[Service]:
    """Serve the app until the block exits (then a graceful uvicorn shutdown). The API key is
    the log's ``settings.api_key`` (made up per app if unset)."""
    app = create_app(log=log, services=services, routers=[webrtc_router, ui_router],
                     **app_kwargs)
    sock = _listen(port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False,
                                           graceful_timeout_s=5))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            svc = Service(f"http://127.0.0.1:{port}", port, app.state.auth.api_key, app, log,
                          server)
            async with svc.client() as c:  # answered once the lifespan has started
                assert (await c.get("/healthz")).status_code == 200
            try:
                yield svc
            finally:
                server.should_exit = True
    finally:
        sock.close()
