"""Running the app under uvicorn with the settings the service needs (``eventcore serve``)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import gc
import logging
import signal
import sys
from types import FrameType
from typing import Any, Literal

import msgspec
import uvicorn
from fastapi import FastAPI

from ._auth import AccessLogRedactor, redact
from ._middleware import MAX_HEADER_BYTES

__all__ = ["GC_THRESHOLDS", "JsonFormatter", "configure_logging", "serve", "serve_async", "tune_gc",
           "uvicorn_config"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exception), tokens redacted."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(out).decode()


def configure_logging(level: str = "info", fmt: Literal["json", "text"] = "json") -> None:
    """Structured (JSON lines) or plain logs on stderr for eventcore and uvicorn."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(AccessLogRedactor())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("eventcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def uvicorn_config(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
    access_log: bool = True, graceful_timeout_s: float = 10.0, **kwargs: Any,
) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, lifespan="on", log_level=log_level, access_log=access_log,
        log_config=None, timeout_graceful_shutdown=int(graceful_timeout_s),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, server_header=False,
        proxy_headers=False,
        # WebSocket frames of a session are the same bytes for each of its clients; deflate
        # would compress them once per client (benchmarks/sse.py --modes ws: 1,000 clients
        # got a fifth of their events with it)
        ws_per_message_deflate=False, **kwargs,
    )


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT, tells the app to end its event streams at once (with a retry hint)
    instead of waiting for them through the graceful-shutdown timeout."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises a captured signal after shutting down, so even a clean drain
            # would end with status -15; a SIGTERM that drained cleanly exits 0.
            self._captured_signals.remove(sig)
        app = self.config.app
        ctx = getattr(getattr(app, "state", None), "eventcore", None)
        if ctx is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.call_soon_threadsafe(ctx.shutdown.set)
            else:
                ctx.shutdown.set()


# An API process holds many long-lived objects (one stream, subscription and task set per SSE
# client); with the default thresholds the cyclic collector rescans them all several times a
# second under load (benchmarks/sse.py: p99 at 5,000 clients 2.0 s -> 0.4 s with these).
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc(thresholds: tuple[int, int, int] | None = GC_THRESHOLDS) -> None:
    if thresholds is not None:
        gc.set_threshold(*thresholds)


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", log_format: Literal["json", "text"] = "json",
          gc_thresholds: tuple[int, int, int] | None = GC_THRESHOLDS, **kwargs: Any) -> None:
    """Run the app until SIGTERM/SIGINT (blocking)."""
    configure_logging(log_level, log_format)
    tune_gc(gc_thresholds)
    _Server(uvicorn_config(app, host=host, port=port, log_level=log_level, **kwargs)).run()


async def serve_async(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
                      log_level: str = "info", **kwargs: Any) -> None:
    """Run the app inside an existing event loop (e.g. next to a worker pool in ``eventcore
    demo``); returns when the server has shut down. Logging and GC are left as configured."""
    await _Server(uvicorn_config(app, host=host, port=port, log_level=log_level,
                                 **kwargs)).serve()
