"""Fixtures of the worker tests (real Redis from the eventcore plugin)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import worker_apps

from eventcore import EventLog
from eventcore.workers import App, Worker

DEFAULTS: dict[str, Any] = {
    "concurrency": 50, "lease_ttl_s": 2.0, "block_ms": 100, "poll_interval_s": 1.0,
    "idle_timeout_s": 60.0, "drain_timeout_s": 5.0,
}


@asynccontextmanager
async def _hosting(log: EventLog, app: App | None = None, **kwargs: Any
                   ) -> AsyncIterator[Worker]:
    async with Worker(app or worker_apps.app, log, **{**DEFAULTS, **kwargs}) as w:
        yield w


@pytest.fixture
def hosting() -> Callable[..., AbstractAsyncContextManager[Worker]]:
    """``async with hosting(log, concurrency=3) as worker:`` runs a worker in the test."""
    worker_apps.state.update(current=0, peak=0)
    return _hosting
