"""The service fixtures, one copy for every suite that runs the real API process (tests/service,
tests/ws, tests/telephony, tests/client): a child process (uvicorn) per test, or one per module
(``shared_service``), each in a namespace of its own.

``module_service`` and ``module_service_env`` are what tests/ws, tests/telephony and
tests/client use as ``service`` and ``service_env``: one API process (same settings as the
per-test one) for a module's tests, which each make sessions of their own; a test marked
``own_api`` (it stops, kills or restarts the API, reads the whole namespace, or makes a
divergence, which gives its shard an epoch every later session there sees, and asserts epochs)
gets a process and a namespace of its own, as before. The start-up of an API process (a Python
interpreter importing the service) is most of such a test's time."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from service_support import Service, service_env_for

from eventcore import EventLog, load_settings

__all__ = ["module_service", "module_service_env", "per_module_service",
           "per_module_service_env", "service", "service_env", "service_log", "shared_log",
           "shared_service"]


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


@pytest.fixture(scope="module")
def module_api_env(redis_session_url: str) -> dict[str, str]:
    """The environment of a module's shared API process: the per-test one's settings (a suite
    with other settings overrides this fixture), in a namespace of the module's own."""
    return service_env_for(redis_session_url)


@pytest.fixture(scope="module")
def module_api(module_api_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Service]:
    yield from _running(module_api_env, tmp_path_factory.mktemp("api"))


@pytest.fixture
def module_service_env(request: pytest.FixtureRequest, module_api_env: dict[str, str]
                       ) -> dict[str, str]:
    """The module's shared API environment, or (``own_api``) the same settings in a namespace
    of this test's own."""
    if request.node.get_closest_marker("own_api"):
        return {**module_api_env, "EVENTCORE_NAMESPACE": f"t{uuid.uuid4().hex[:12]}"}
    return module_api_env


@pytest.fixture
def module_service(request: pytest.FixtureRequest, module_service_env: dict[str, str],
                   tmp_path: Path) -> Iterator[Service]:
    """The module's shared API process (``own_api``: a process of this test's own)."""
    if request.node.get_closest_marker("own_api"):
        yield from _running(module_service_env, tmp_path)
        return
    shared: Service = request.getfixturevalue("module_api")
    yield shared
    for p in reversed(shared.procs[1:]):  # workers this test started
        p.stop()
    del shared.procs[1:]
    api = shared.api
    if api.proc is None or api.proc.poll() is not None:  # a failed test left it down
        api.start()


@pytest.fixture(name="service_env")
def per_module_service_env(module_service_env: dict[str, str]) -> dict[str, str]:
    """``service_env`` for a folder whose tests share the module's API process (its conftest
    imports this and :func:`per_module_service`)."""
    return module_service_env


@pytest.fixture(name="service")
def per_module_service(module_service: Service) -> Service:
    """``service`` for a folder whose tests share the module's API process."""
    return module_service


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
