"""``eventcore worker APP``: run a worker process (registered on the eventcore CLI)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Annotated

import anyio
import typer
from anyio.abc import TaskStatus

from eventcore import EventLog, load_settings
from eventcore._imports import import_object
from eventcore._schedules import scheduler_for
from eventcore.errors import ConfigError, WorkerFailed
from eventcore.workers._app import App, RetryPolicy
from eventcore.workers._worker import Worker

__all__ = ["load_app", "worker"]

log = logging.getLogger("workers")


def load_app(spec: str) -> App:
    """``module:attribute`` (attribute may be dotted) -> the :class:`App` it names. The
    current directory is importable, as with uvicorn."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = import_object(spec, "APP")
    if not isinstance(obj, App):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a workers.App")
    return obj


def worker(
    app: Annotated[str, typer.Argument(help="The App to host, as module:attribute.")],
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-c", min=1, help="Most sessions hosted at once.")] = 1000,
    lease_ttl: Annotated[float, typer.Option(
        min=0.2, help="Seconds a dead worker's sessions wait before another takes them.")] = 15.0,
    drain_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM/SIGINT: seconds running sessions get before hand-back.")] = 30.0,
    idle_timeout: Annotated[float, typer.Option(
        min=0.01, help="Seconds without input before a session is unloaded.")] = 300.0,
    run_timeout: Annotated[float | None, typer.Option(
        help="Default limit of one run (seconds).")] = None,
    session_timeout: Annotated[float | None, typer.Option(
        help="Default limit of a whole session from its creation (seconds).")] = None,
    max_attempts: Annotated[int, typer.Option(
        min=1, help="Attempts of a failing handler before it is dead-lettered.")] = 3,
    backoff: Annotated[float, typer.Option(
        min=0, help="Base retry backoff (seconds, doubled per attempt, jittered).")] = 1.0,
    max_backoff: Annotated[float, typer.Option(min=0, help="Retry backoff cap.")] = 60.0,
    burst: Annotated[bool, typer.Option(
        help="Exit when there is nothing left to host.")] = False,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on this port.")] = None,
    metrics_addr: Annotated[str, typer.Option(help="Address of the metrics server.")] = "0.0.0.0",
    worker_id: Annotated[str | None, typer.Option(help="Default: host-pid-random.")] = None,
    max_failures: Annotated[int, typer.Option(
        min=1, help="Exit non-zero after this many consecutive failures.")] = 5,
    max_deliveries: Annotated[int, typer.Option(
        min=1, help="Dead-letter a session whose hosts died with it this many times.")] = 10,
    poll_interval: Annotated[float, typer.Option(
        min=0.05, help="Safety-net re-check of hosted streams (seconds).")] = 5.0,
    presence_interval: Annotated[float, typer.Option(
        min=0, help="Seconds between checks for dead workers (their connections closed), whose "
                    "sessions are then taken over at once; 0: only after their leases.")] = 0.1,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = "INFO",
) -> None:
    """Host sessions of APP's agents. SIGTERM/SIGINT drain (a second signal hands the running
    sessions back at once); exits non-zero when the supervisor gives up."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        the_app = load_app(app)
        settings = load_settings()
        policy = RetryPolicy(max_attempts=max_attempts, backoff_s=backoff,
                             max_backoff_s=max_backoff)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    from ._preflight import require_redis

    require_redis("worker", settings)

    async def main() -> None:
        async with EventLog(settings) as event_log, scheduler_for(event_log):
            w = Worker(the_app, event_log, concurrency=concurrency, lease_ttl_s=lease_ttl,
                       drain_timeout_s=drain_timeout, worker_id=worker_id,
                       idle_timeout_s=idle_timeout, run_timeout_s=run_timeout,
                       session_timeout_s=session_timeout, retry=policy,
                       max_consecutive_failures=max_failures, poll_interval_s=poll_interval,
                       max_deliveries=max_deliveries,
                       presence_interval_s=presence_interval or None)
            server = None
            if metrics_port is not None:
                from prometheus_client import start_http_server

                server, _ = start_http_server(metrics_port, metrics_addr,
                                              registry=w.metrics.registry)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_on_signals, w)

                    async def serve(*, task_status: TaskStatus[None]) -> None:
                        if burst:
                            await w.run_burst(task_status=task_status)
                        else:
                            await w.run(task_status=task_status)
                        tg.cancel_scope.cancel()

                    await tg.start(serve)
                    print(json.dumps({"event": "ready", "worker_id": w.id, "pid": os.getpid(),
                                      "metrics_port": metrics_port}), flush=True)
            finally:
                if server is not None:
                    server.shutdown()
                print(json.dumps({"event": "stopped", "worker_id": w.id,
                                  **w.metrics.snapshot()}), flush=True)

    try:
        anyio.run(main)
    except* WorkerFailed as group:
        typer.echo(f"error: {group.exceptions[0]}", err=True)
        raise typer.Exit(1) from None
    except* ConfigError as group:
        typer.echo(f"error: {group.exceptions[0]}", err=True)
        raise typer.Exit(2) from None


async def _on_signals(w: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        seen = 0
        async for sig in signals:
            seen += 1
            log.info("worker %s got %s: %s", w.id, signal.Signals(sig).name,
                     "draining" if seen == 1 else "handing sessions back now")
            w.drain(now=seen > 1)
