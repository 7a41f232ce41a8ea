"""The WebSocket tests run against the real API process of tests/service (its fixtures): one
per module, each test with sessions of its own (``own_api``: a process of the test's own)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))

from service_fixtures import (
    module_api,
    module_api_env,
    module_service,
    module_service_env,
    per_module_service,
    per_module_service_env,
    service_log,
)

__all__ = ["module_api", "module_api_env", "module_service", "module_service_env",
           "per_module_service", "per_module_service_env", "service_log"]

