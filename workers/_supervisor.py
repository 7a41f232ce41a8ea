"""The supervisor: counts consecutive failures of each of the worker's loops and gives up (the
process exits non-zero, so the platform restarts it) when one reaches the limit."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ._metrics import WorkerMetrics

__all__ = ["Supervisor"]

log = logging.getLogger("workers")


class Supervisor:
    def __init__(self, limit: int, metrics: WorkerMetrics,
                 give_up: Callable[[str, BaseException], None]) -> None:
        self.limit = limit
        self._metrics = metrics
        self._give_up = give_up
        self._counts: dict[str, int] = {}

    def ok(self, component: str) -> None:
        if self._counts.get(component):
            self._counts[component] = 0
            self._metrics.consecutive_failures = max(self._counts.values())

    def failed(self, component: str, exc: BaseException) -> None:
        n = self._counts.get(component, 0) + 1
        self._counts[component] = n
        self._metrics.consecutive_failures = max(self._counts.values())
        log.warning("worker %s failed (%d in a row): %s", component, n, exc)
        if n >= self.limit:
            self._give_up(component, exc)

    def backoff_s(self, component: str) -> float:
        return min(2.0, 0.05 * 2.0 ** self._counts.get(component, 0))
