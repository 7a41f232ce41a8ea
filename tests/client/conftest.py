"""The Python client against real service processes (tests/service's API and worker
subprocesses), each test in a namespace of its own."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from service_support import API_KEY, MAIN, Service

from eventcore import EventLog, load_settings

__all__ = ["API_KEY"]


@pytest.fixture
def service_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    env.update({
        "EVENTCORE_REDIS_URL": redis_url,
        "EVENTCORE_NAMESPACE": f"t{uuid.uuid4().hex[:12]}",
        "EVENTCORE_SHARDS": "4",
        "EVENTCORE_API_KEY": API_KEY,
        "EVENTCORE_SSE_HEARTBEAT_S": "1",
        "EVENTCORE_RETRY_BUDGET_S": "5",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(MAIN.parent),
                                                    os.environ.get("PYTHONPATH")])),
    })
    return env


@pytest.fixture
def service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    svc = Service(service_env, tmp_path)
    svc.api.start()
    try:
        yield svc
    finally:
        for p in reversed(svc.procs):
            p.stop()


@pytest.fixture
async def service_log(service_env: dict[str, str]) -> AsyncIterator[EventLog]:
    settings = load_settings(redis_url=service_env["EVENTCORE_REDIS_URL"],
                             namespace=service_env["EVENTCORE_NAMESPACE"], shards=4)
    async with EventLog(settings) as log:
        yield log
