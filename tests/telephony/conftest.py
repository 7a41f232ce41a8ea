"""The telephony tests run against the real API process of tests/service (its fixtures)."""

from __future__ import annotations

import sys
from pathlib import Path

for _d in ("service", "ws"):
    sys.path.insert(0, str(Path(__file__).parents[1] / _d))

from service_fixtures import service, service_env, service_log  # noqa: E402

__all__ = ["service", "service_env", "service_log"]
