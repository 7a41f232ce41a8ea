"""The WebSocket tests run against the real API process of tests/service (its fixtures): one
per module, each test with sessions of its own (``own_api``: a process of the test's own)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))

from service_fixtures import (
    module_api,
    module_api_env,
    module_service,
    module_service_env,
    service_log,
)
from service_support import Service

__all__ = ["module_api", "module_api_env", "module_service", "module_service_env",
           "service_log"]


@pytest.fixture
def service_env(module_service_env: dict[str, str]) -> dict[str, str]:
    return module_service_env


@pytest.fixture
def service(module_service: Service) -> Service:
    return module_service
