"""``eventcore demo``: the whole system in one process on the embedded Redis.

API + SSE hub + projector + persistence + WebRTC + a worker hosting the sample ``echo`` agent
(:mod:`eventcore.server.demo`). It creates a session through the HTTP API, feeds it inputs, shows
the live SSE stream in the terminal and prints the URLs to open.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import signal
import socket
from typing import Any

import anyio
import httpx
import msgspec
import pydantic
from httpx_sse import aconnect_sse
from rich.console import Console

from eventcore._log import EventLog
from eventcore._settings import Settings, load_settings

__all__ = ["run_demo"]

DEMO_INPUTS = ("hello", "what is eventcore?", "show me a tool call")
_COLORS = {"input": "green", "message": "magenta", "signal": "yellow", "session": "cyan",
           "run": "blue", "tool": "bright_black"}


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(host: str, port: int) -> int:
    if port and _port_free(host, port):
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        free: int = s.getsockname()[1]
        return free


def _line(env: dict[str, Any]) -> str:
    kind = str(env.get("type", "?"))
    color = _COLORS.get(kind.split(".")[0], "white")
    payload = msgspec.json.encode(env.get("payload")).decode()
    if len(payload) > 100:
        payload = payload[:97] + "..."
    return f"[cyan]{env.get('seq', 0):>4}[/] [{color}]{kind:<15}[/] {payload}"


async def run_demo(
    *, host: str = "127.0.0.1", port: int = 8000, exit_after: float | None = None,
    console: Console | None = None, settings: Settings | None = None, embedded: bool = False,
) -> None:
    from eventcore.workers import Worker

    from ._dev import QuietServer
    from ._http import uvicorn_config
    from ._system import service_app
    from .demo import app as agents

    out = console or Console()
    api_key = secrets.token_urlsafe(24)
    if settings is None:
        settings = load_settings(api_key=pydantic.SecretStr(api_key))
    else:
        settings = settings.model_copy(update={"api_key": pydantic.SecretStr(api_key)})
    port = pick_port(host, port)
    base = f"http://{host}:{port}"
    main = anyio.CancelScope()  # the session on screen; a signal cancels it, then a clean stop
    got: list[str] = []
    async with EventLog(settings) as log, anyio.create_task_group() as tg:
        where = (f"embedded redis-server, data in {settings.data_dir}" if embedded
                 else settings.redis_url or f"embedded redis-server, data in {settings.data_dir}")
        out.print(f"[bold]eventcore demo[/] - Redis: {where}")
        signals = anyio.CancelScope()
        tg.start_soon(_on_signals, signals, main, got)
        api = service_app(agents, log=log)
        server = QuietServer(uvicorn_config(api, host=host, port=port, log_level="warning"))
        tg.start_soon(server.serve)
        worker = Worker(agents, log, concurrency=100, lease_ttl_s=10, idle_timeout_s=600)
        await tg.start(worker.run)
        with main:
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                await _wait_ready(http)
                created = (await http.post(
                    "/v1/sessions", json={"agent": "echo", "metadata": {"demo": "yes"}},
                    headers={"Authorization": f"Bearer {api_key}"},
                )).raise_for_status().json()
                sid, token = created["session_id"], created["token"]
                _print_urls(out, base, sid, token, api_key)
                with anyio.move_on_after(math.inf if exit_after is None else exit_after):
                    async with anyio.create_task_group() as session_tg:
                        session_tg.start_soon(_feed, http, sid, token)
                        await _show(out, http, sid, token)
                        session_tg.cancel_scope.cancel()
        # Graceful stop: SSE streams end with a retry hint, the server's services (subscribers,
        # WebRTC) close, the worker hands its sessions back.
        if api.state.eventcore is not None:
            api.state.eventcore.shutdown.set()
        server.should_exit = True
        worker.drain(now=True)
        signals.cancel()
    if got:
        out.print(f"[bold]demo stopped[/] ({got[0]}); the session stays in "
                  f"{settings.data_dir}/")
    elif exit_after is not None:
        out.print(f"[bold]demo stopped[/] after {exit_after:g} s (--exit-after); the session "
                  f"stays in {settings.data_dir}/")


async def _on_signals(scope: anyio.CancelScope, main: anyio.CancelScope, got: list[str]
                      ) -> None:
    """SIGTERM and SIGINT end the demo the way --exit-after does (a graceful stop)."""
    with scope, anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            if not got:
                got.append(signal.Signals(sig).name)
            main.cancel()


async def _wait_ready(http: httpx.AsyncClient) -> None:
    with anyio.fail_after(30):
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await anyio.sleep(0.1)  # the server has no other readiness signal to await


def _print_urls(out: Console, base: str, sid: str, token: str, api_key: str) -> None:
    auth = f"-H 'Authorization: Bearer {token}'"
    lines = [
        ("live viewer", f"{base}/ui#session={sid}&token={token}"),
        ("SSE stream", f"curl -N {auth} {base}/v1/sessions/{sid}/events"),
        ("state", f"curl {auth} {base}/v1/sessions/{sid}"),
        ("send input", f"curl {auth} -H 'Content-Type: application/json' "
                       f"-d '{{\"payload\": {{\"text\": \"hi\"}}}}' "
                       f"{base}/v1/sessions/{sid}/inputs"),
        ("follow", f".venv/bin/eventcore tail {sid} --url {base} --token {token}"),
        ("API docs", f"{base}/docs"),
        ("metrics", f"{base}/metrics"),
        ("API key", f"{api_key}   (admin credential, this run only)"),
    ]
    out.rule(f"session {sid}")
    for name, value in lines:
        out.print(f"[bold]{name:<12}[/] {value}", soft_wrap=True, highlight=False)
    out.rule("live stream (SSE)")


async def _feed(http: httpx.AsyncClient, sid: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    for i, text in enumerate(DEMO_INPUTS):
        await anyio.sleep(1.0)  # paced so a person can watch the stream
        await http.post(f"/v1/sessions/{sid}/inputs", headers=headers,
                        json={"payload": {"text": text}, "idempotency_key": f"demo-{i}"})


async def _show(out: Console, http: httpx.AsyncClient, sid: str, token: str) -> None:
    """Follow the session's SSE stream (resuming by Last-Event-ID) until it ends."""
    last = 0
    while True:
        headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(last)}
        try:
            async with aconnect_sse(http, "GET", f"/v1/sessions/{sid}/events", headers=headers,
                                    timeout=httpx.Timeout(10, read=None)) as source:
                if source.response.status_code == 204:
                    return
                async for sse in source.aiter_sse():
                    if not sse.data or not sse.id:
                        continue
                    env = msgspec.json.decode(sse.data)
                    last = int(sse.id)
                    out.print(_line(env), soft_wrap=True, highlight=False)
                    if env.get("type") == "session.ended":
                        return
        except httpx.TransportError:
            await anyio.sleep(0.5)  # server restarting: resume from `last`
