"""Real processes for the HTTP service tests: the API (uvicorn) and a worker, as subprocesses
of this test run, on the test session's redis-server, each test in a namespace of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from service_support import API_KEY, MAIN, Proc, Service  # noqa: F401

from eventcore import EventLog, load_settings


@pytest.fixture
def service_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    env.update({
        "EVENTCORE_REDIS_URL": redis_url,
        "EVENTCORE_NAMESPACE": f"t{uuid.uuid4().hex[:12]}",
        "EVENTCORE_SHARDS": "4",
        "EVENTCORE_API_KEY": API_KEY,
        "EVENTCORE_HTTP_MAX_BODY": str(64 * 1024),
        "EVENTCORE_SSE_HEARTBEAT_S": "1",
        "EVENTCORE_SSE_SEND_TIMEOUT_S": "3",
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
    """The service's log, opened by the test to check what was (not) written."""
    settings = load_settings(redis_url=service_env["EVENTCORE_REDIS_URL"],
                             namespace=service_env["EVENTCORE_NAMESPACE"], shards=4)
    async with EventLog(settings) as log:
        yield log


@pytest.fixture(scope="module")
def shared_service(redis_session_url: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Service]:
    """One API process for a whole module of tests that do not stop or restart it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    env.update({
        "EVENTCORE_REDIS_URL": redis_session_url,
        "EVENTCORE_NAMESPACE": f"t{uuid.uuid4().hex[:12]}",
        "EVENTCORE_SHARDS": "4",
        "EVENTCORE_API_KEY": API_KEY,
        "EVENTCORE_HTTP_MAX_BODY": str(64 * 1024),
        "EVENTCORE_RETRY_BUDGET_S": "5",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(MAIN.parent),
                                                    os.environ.get("PYTHONPATH")])),
    })
    svc = Service(env, tmp_path_factory.mktemp("svc"))
    svc.api.start()
    try:
        yield svc
    finally:
        for p in reversed(svc.procs):
            p.stop()


@pytest.fixture
async def shared_log(shared_service: Service) -> AsyncIterator[EventLog]:
    env = shared_service.env
    settings = load_settings(redis_url=env["EVENTCORE_REDIS_URL"],
                             namespace=env["EVENTCORE_NAMESPACE"], shards=4)
    async with EventLog(settings) as log:
        yield log
