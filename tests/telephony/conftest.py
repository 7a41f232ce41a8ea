"""The telephony tests run against the real API process of tests/service (its fixtures): one
per module, each test with calls and sessions of its own."""

from __future__ import annotations

import sys
from pathlib import Path

for _d in ("service", "ws"):
    sys.path.insert(0, str(Path(__file__).parents[1] / _d))

from service_fixtures import (  # noqa: E402
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

