"""Fixtures for subscriber tests: a history database per test (a SQLite file, or uniquely
prefixed tables in the local PostgreSQL's ``test`` database, dropped after)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from subscriber_helpers import PG_URL

from eventcore import EventLog
from eventcore.subscribers import Persistence


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    return PG_URL


@pytest.fixture
def table_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}_"


@pytest.fixture
async def persistence(
    event_log: EventLog, db_url: str, table_prefix: str
) -> AsyncIterator[Persistence]:
    async with Persistence(event_log, db_url, prefix=table_prefix) as p:
        try:
            yield p
        finally:
            await p.drop_tables()
