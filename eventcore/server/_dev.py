"""``eventcore dev APP``: your app on the embedded Redis, API and worker in one command, reloaded
when its code changes.

The command (the *supervisor*) starts the embedded redis-server (unless ``EVENTCORE_REDIS_URL``
names one), makes up an API key (unless ``EVENTCORE_API_KEY`` is set), then runs the *app
process*: the HTTP API (with the built-in subscribers, ``/ui`` and ``/docs``) and a worker
hosting APP's agents, one process. With ``--reload`` (the default) it watches the current
directory's Python files (watchfiles) and, on a change, stops the app process (the worker hands
its sessions back at once) and starts a new one on the same port; Redis, and so every session,
stays. SIGTERM or SIGINT stop the app process and then the redis-server it started: nothing it
started outlives it.

Helpers shared with ``eventcore demo``: :func:`embedded_redis` (the redis-server owned by the
command, stopped in a ``finally`` whatever ends the command) and :class:`QuietServer` (uvicorn
without its own signal handlers, so the command decides what a signal does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import uvicorn
from rich.console import Console

from eventcore._embedded import EmbeddedRedis
from eventcore._settings import Settings, load_settings
from eventcore.errors import ConfigError, EventcoreError

__all__ = ["QuietServer", "child_main", "embedded_redis", "run_dev", "terminate_on_sigterm"]

log = logging.getLogger("eventcore.server")

CHILD = "from eventcore.server._dev import child_main; child_main()"
EXIT_CONFIG = 3
"""The app process's exit status for an app that cannot be loaded (a one-line error)."""


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM/SIGINT are the command's to handle (uvicorn
    would catch them, stop only itself and then re-raise them, killing the process before its
    embedded Redis is stopped)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def terminate_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt (as SIGINT does) wherever the process is, so ``finally``
    blocks run (the embedded Redis is stopped) instead of the process dying on the spot. Inside
    ``anyio.run`` the commands install their own receivers, which take precedence."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextlib.contextmanager
def embedded_redis(settings: Settings, out: Callable[[str], None] | None = None
                   ) -> Iterator[Settings]:
    """``settings`` pointing at a redis-server: the configured one, or the embedded one for the
    data dir, started here and stopped when the block exits (however it exits)."""
    if settings.redis_url:
        yield settings
        return
    server = EmbeddedRedis(settings.data_dir, settings.redis_server)
    url = server.start()
    try:
        if out is not None and not server.owned:
            out(f"reusing the redis-server another process started for {settings.data_dir}")
        yield settings.model_copy(update={"redis_url": url})
    finally:
        server.stop()


# -- the app process ---------------------------------------------------------------------------
def child_main() -> None:
    """The app process: ``python -c CHILD APP HOST PORT`` with the supervisor's environment."""
    spec, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _exit_with_parent()
    from ._http import configure_logging

    configure_logging("info", "text")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    try:
        from ._worker_cli import load_app

        agents = load_app(spec)
        settings = load_settings()
    except ConfigError as exc:
        print(f"eventcore dev: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    except Exception as exc:  # the user's module failed to import: show where, keep watching
        import traceback

        traceback.print_exc()
        print(f"eventcore dev: error: could not load {spec}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_app_process, agents, settings, host, port)


def _exit_with_parent() -> None:
    """If the supervisor dies without stopping this process (SIGKILL), SIGTERM ourselves: the
    graceful stop once it is installed, the default (exit) before."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)  # no event tells a process its parent died (prctl aside)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="eventcore-dev-parent", daemon=True).start()


async def _app_process(agents: Any, settings: Settings, host: str, port: int) -> None:
    from eventcore._log import EventLog
    from eventcore.workers import Worker

    from ._http import uvicorn_config
    from ._system import service_app

    async with EventLog(settings) as event_log, anyio.create_task_group() as tg:
        api = service_app(agents, log=event_log)
        server = QuietServer(uvicorn_config(api, host=host, port=port, log_level="warning",
                                            access_log=False, graceful_timeout_s=2))
        worker = Worker(agents, event_log, concurrency=100, lease_ttl_s=5, idle_timeout_s=300,
                        drain_timeout_s=1)

        done = anyio.Event()

        def stop() -> None:
            done.set()
            ctx = api.state.eventcore
            if ctx is not None:
                ctx.shutdown.set()
            server.should_exit = True
            worker.drain(now=True)

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop()
                    return

        watchers = anyio.CancelScope()

        async def watch() -> None:
            with watchers:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(on_signals)

        tg.start_soon(watch)
        tg.start_soon(server.serve)
        await tg.start(worker.run)
        await done.wait()  # then serve() and run() return, once drained
        watchers.cancel()


# -- the supervisor ----------------------------------------------------------------------------
async def _ready(base: str, proc: Any, within: float = 60.0) -> bool:
    async with httpx.AsyncClient(base_url=base, timeout=2) as http:
        with anyio.move_on_after(within):
            while proc.returncode is None:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/readyz")).status_code == 200:
                        return True
                await anyio.sleep(0.1)  # the app process's readiness shows only over HTTP
    return False


async def _stop_child(proc: Any, grace_s: float = 15.0) -> None:
    with anyio.CancelScope(shield=True):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with anyio.move_on_after(grace_s):
                await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def _watch_child(
    proc: Any, base: str, stopping: anyio.Event,
    changes: anyio.abc.ObjectReceiveStream[set[Any]], *, reload: bool, out: Console,
    first: bool,
) -> tuple[str, bool]:
    """Until the app process exits (``"exited"``), a watched file changes (``"changed"``) or
    the command is told to stop (``"stop"``); announces readiness meanwhile. Returns the outcome
    and whether the first readiness is still to be announced."""
    outcome = "stop"
    async with anyio.create_task_group() as waiting:
        async def announce() -> None:
            nonlocal first
            if await _ready(base, proc):
                out.print("eventcore dev: ready" if first else "eventcore dev: reloaded, ready",
                          highlight=False)
                first = False

        async def exited() -> None:
            nonlocal outcome
            await proc.wait()
            outcome = "exited"
            waiting.cancel_scope.cancel()

        async def changed() -> None:
            nonlocal outcome
            got = await changes.receive()
            names = sorted({Path(p).name for _, p in got})
            out.print(f"eventcore dev: {', '.join(names)[:200]} changed: reloading",
                      highlight=False)
            outcome = "changed"
            waiting.cancel_scope.cancel()

        async def stopped() -> None:
            await stopping.wait()
            waiting.cancel_scope.cancel()

        waiting.start_soon(announce)
        waiting.start_soon(exited)
        waiting.start_soon(stopped)
        if reload:
            waiting.start_soon(changed)
    return outcome, first


async def run_dev(
    spec: str, settings: Settings, *, host: str, port: int, reload: bool, api_key: str,
    out: Console, watch_dir: Path,
) -> int:
    """Supervise the app process until SIGTERM/SIGINT (or, without reload, until it exits);
    returns the exit status for the command."""
    env = {**os.environ, "EVENTCORE_REDIS_URL": str(settings.redis_url),
           "EVENTCORE_API_KEY": api_key, "EVENTCORE_DATA_DIR": str(settings.data_dir)}
    cmd = [sys.executable, "-c", CHILD, spec, host, str(port)]
    base = f"http://{host}:{port}"
    stopping = anyio.Event()
    changed_send, changed_recv = anyio.create_memory_object_stream[set[Any]](16)
    status = 0

    async def on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:  # kept open: a second signal must not kill us mid-stop
                if not stopping.is_set():
                    out.print(f"eventcore dev: {signal.Signals(sig).name}: stopping")
                stopping.set()

    async def watch() -> None:
        from watchfiles import PythonFilter, awatch

        async for changes in awatch(watch_dir, watch_filter=PythonFilter(),
                                    stop_event=stopping):
            await changed_send.send(changes)

    proc: Any = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signals)
        if reload:
            tg.start_soon(watch)
        first = True
        try:
            while not stopping.is_set():
                proc = await anyio.open_process(cmd, env=env, stdin=subprocess.DEVNULL,
                                                stdout=None, stderr=None)
                _children[:] = [proc.pid]
                outcome, first = await _watch_child(proc, base, stopping, changed_recv,
                                                    reload=reload, out=out, first=first)
                await _stop_child(proc)
                _children.clear()
                if outcome == "exited":
                    status = proc.returncode or 0
                    if not reload:
                        break
                    out.print(f"eventcore dev: the app process exited (status {status}); "
                              "fix the code and save to restart", highlight=False)
                    async with anyio.create_task_group() as idle:
                        async def on_change() -> None:
                            await changed_recv.receive()
                            idle.cancel_scope.cancel()

                        async def on_stop() -> None:
                            await stopping.wait()
                            idle.cancel_scope.cancel()

                        idle.start_soon(on_change)
                        idle.start_soon(on_stop)
                    # drain the burst of events one save makes
                    with contextlib.suppress(anyio.WouldBlock):
                        while True:
                            changed_recv.receive_nowait()
            if stopping.is_set():
                status = 0
        finally:
            if proc is not None:
                await _stop_child(proc)
                _children.clear()
            stopping.set()
            tg.cancel_scope.cancel()
    return status


_children: list[int] = []
"""The app process running now (its pid), for the last-resort kill in :func:`dev_command`."""


def _kill_leftover() -> None:
    for pid in _children:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    _children.clear()


def dev_command(spec: str, *, host: str, port: int, reload: bool, out: Console) -> None:
    """What ``eventcore dev`` runs (see the module's docstring)."""
    import typer

    from ._demo import pick_port
    from ._worker_cli import load_app

    terminate_on_sigterm()
    try:
        load_app(spec)  # a wrong APP is reported at once, before anything is started
        settings = load_settings()
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        if key is not None and len(key) < 16:
            raise ConfigError("EVENTCORE_API_KEY must be at least 16 characters")
    except ConfigError as exc:
        typer.echo(f"eventcore dev: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # the user's module does not import
        typer.echo(f"eventcore dev: error: could not load {spec}: {type(exc).__name__}: {exc}",
                   err=True)
        raise typer.Exit(2) from None
    from ._preflight import require_redis

    require_redis("dev", settings)
    api_key = key or secrets.token_urlsafe(24)
    port = pick_port(host, port)
    base = f"http://{host}:{port}"
    try:
        with embedded_redis(settings, out.print) as running:
            where = settings.redis_url or f"embedded redis-server, data in {settings.data_dir}"
            out.print(f"[bold]eventcore dev[/] {spec} - Redis: {where}")
            for name, value in (("API", base), ("UI", f"{base}/ui"), ("docs", f"{base}/docs"),
                                ("API key", api_key)):
                out.print(f"  [bold]{name:<8}[/] {value}", highlight=False, soft_wrap=True)
            out.print(f"  [bold]{'reload':<8}[/] " + (
                f"on: watching {Path.cwd()} (*.py)" if reload else "off"), highlight=False)
            try:
                status = anyio.run(lambda: run_dev(
                    spec, running, host=host, port=port, reload=reload, api_key=api_key,
                    out=out, watch_dir=Path.cwd()))
            finally:
                _kill_leftover()  # only if the graceful path was cut short; before Redis stops
    except KeyboardInterrupt:
        status = 0
    except EventcoreError as exc:
        typer.echo(f"eventcore dev: error: {exc}", err=True)
        raise typer.Exit(1) from None
    out.print("eventcore dev: stopped")
    raise typer.Exit(status)
