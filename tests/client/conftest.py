"""The Python client against real service processes (tests/service's API and worker
subprocesses, its fixtures), each test in a namespace of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from service_fixtures import service, service_log
from service_support import API_KEY, service_env_for

__all__ = ["API_KEY", "service", "service_log"]


@pytest.fixture
def service_env(redis_url: str) -> dict[str, str]:
    # the client tests run on the API's own body-size limit and send timeout
    return service_env_for(redis_url, EVENTCORE_HTTP_MAX_BODY=None,
                           EVENTCORE_SSE_SEND_TIMEOUT_S=None)
