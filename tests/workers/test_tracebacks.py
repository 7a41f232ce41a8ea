"""A failing handler's traceback: in the worker log, and in the ``server_data`` of its
``run.failed`` envelope, which no client read returns (SSE, JSON pages)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec
import pytest
from httpx_sse import aconnect_sse
from live_service import serve
from workers_support import watching

from eventcore import EventLog
from eventcore.testing.invariants import read_all
from eventcore.workers import Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


async def test_run_failed_keeps_the_traceback_server_side(
    event_log: EventLog, hosting: Hosting, caplog: pytest.LogCaptureFixture
) -> None:
    log = event_log
    caplog.set_level(logging.WARNING, logger="workers")
    async with hosting(log) as _, watching(log) as feed:
        s = await log.create_session("flaky", labels={"fail_until": "2"}, input="go")
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "session.ended") == 1)
    failed = [e for e in await read_all(log, sid) if e.type == "run.failed"]
    assert len(failed) == 1
    tb = failed[0].server_data["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "worker_apps.py" in tb and tb.endswith("ValueError: attempt 1 failed")
    logged = [r for r in caplog.records if r.name == "workers" and r.exc_info]
    assert any("attempt 1 failed" in str(r.exc_info[1]) for r in logged)  # type: ignore[index]
    text = caplog.text
    assert "Traceback (most recent call last):" in text and "worker_apps.py" in text

    # no client read carries it
    async with serve(log) as svc, svc.client(svc.api_key) as c:
        page = await c.get(f"/v1/sessions/{sid}/events", params={"format": "json"})
        assert page.status_code == 200
        body: dict[str, Any] = page.json()
        assert any(e["type"] == "run.failed" for e in body["events"])
        assert "traceback" not in page.text and "server_data" not in page.text
        seen = []
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    seen.append(msgspec.json.decode(sse.data))
                    assert "traceback" not in sse.data and "server_data" not in sse.data
                    if seen[-1]["type"] == "session.ended":
                        break
        assert "run.failed" in [e["type"] for e in seen]
