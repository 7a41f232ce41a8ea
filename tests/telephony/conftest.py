"""The telephony tests run against the real API process of tests/service (its fixtures): one
per module, each test with calls and sessions of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

for _d in ("service", "ws"):
    sys.path.insert(0, str(Path(__file__).parents[1] / _d))

from service_fixtures import (  # noqa: E402
    module_api,
    module_api_env,
    module_service,
    module_service_env,
    service_log,
)
from service_support import Service  # noqa: E402

__all__ = ["module_api", "module_api_env", "module_service", "module_service_env",
           "service_log"]


@pytest.fixture
def service_env(module_service_env: dict[str, str]) -> dict[str, str]:
    return module_service_env


@pytest.fixture
def service(module_service: Service) -> Service:
    return module_service
