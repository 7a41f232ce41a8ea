"""The service fixtures, one copy for every suite that runs the real API process (tests/service,
tests/ws, tests/telephony, tests/client): a child process (uvicorn) per test, or one per module
(``shared_service``), each in a namespace of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from service_support import Service, service_env_for

from eventcore import EventLog, load_settings

__all__ = ["service", "service_env", "service_log", "shared_log", "shared_service"]


@pytest.fixture
def service_env(redis_url: str) -> dict[str, str]:
    return service_env_for(redis_url)


def _running(env: dict[str, str], path: Path) -> Iterator[Service]:
    svc = Service(env, path)
    svc.api.start()
    try:
        yield svc
    finally:
        for p in reversed(svc.procs):
            p.stop()


@pytest.fixture
def service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    yield from _running(service_env, tmp_path)


async def _log_of(env: dict[str, str]) -> AsyncIterator[EventLog]:
    settings = load_settings(redis_url=env["EVENTCORE_REDIS_URL"],
                             namespace=env["EVENTCORE_NAMESPACE"], shards=4)
    async with EventLog(settings) as log:
        yield log


@pytest.fixture
async def service_log(service_env: dict[str, str]) -> AsyncIterator[EventLog]:
    """The service's log, opened by the test to check what was (not) written."""
    async for log in _log_of(service_env):
        yield log


@pytest.fixture(scope="module")
def shared_service(redis_session_url: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Service]:
    """One API process for a whole module of tests that do not stop or restart it."""
    env = service_env_for(redis_session_url, EVENTCORE_SSE_HEARTBEAT_S=None,
                          EVENTCORE_SSE_SEND_TIMEOUT_S=None)
    yield from _running(env, tmp_path_factory.mktemp("svc"))


@pytest.fixture
async def shared_log(shared_service: Service) -> AsyncIterator[EventLog]:
    async for log in _log_of(shared_service.env):
        yield log
