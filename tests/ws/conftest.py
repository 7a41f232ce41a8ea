"""The WebSocket tests run against the real API process of tests/service (its fixtures)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))

from service_fixtures import service, service_env, service_log

__all__ = ["service", "service_env", "service_log"]
