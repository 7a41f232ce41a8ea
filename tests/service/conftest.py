"""Real processes for the HTTP service tests: the API (uvicorn) and a worker, as subprocesses
of this test run, on the test session's Redis, each test in a namespace of its own (the
fixtures live in ``service_fixtures``, shared with tests/ws, tests/telephony, tests/client)."""

from __future__ import annotations

from service_fixtures import service, service_env, service_log, shared_log, shared_service
from service_support import API_KEY, MAIN, Proc, Service  # noqa: F401

__all__ = ["service", "service_env", "service_log", "shared_log", "shared_service"]
