"""The Python client against real service processes (tests/service's API and worker
subprocesses, its fixtures): one API process per module, each test with sessions of its own
(``own_api``: a process and a namespace of the test's own)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from service_fixtures import (
    module_api,
    module_service,
    module_service_env,
    per_module_service,
    per_module_service_env,
    service_log,
)
from service_support import API_KEY, service_env_for

__all__ = ["API_KEY", "module_api", "module_service", "module_service_env", "per_module_service",
           "per_module_service_env", "service_log"]


@pytest.fixture(scope="module")
def module_api_env(redis_session_url: str) -> dict[str, str]:
    # the client tests run on the API's own body-size limit and send timeout
    return service_env_for(redis_session_url, EVENTCORE_HTTP_MAX_BODY=None,
                           EVENTCORE_SSE_SEND_TIMEOUT_S=None)

