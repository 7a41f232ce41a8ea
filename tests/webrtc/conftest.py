from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from live_service import Service, serve

from eventcore import EventLog


@pytest.fixture
async def service(event_log: EventLog) -> AsyncIterator[Service]:
    async with serve(event_log) as svc:
        yield svc
