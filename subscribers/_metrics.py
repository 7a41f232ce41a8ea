"""Counters and gauges of one subscriber runner."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SubscriberMetrics"]


@dataclass
class SubscriberMetrics:
    """What one runner did (counters) and how its group stands (gauges, refreshed every
    ``metrics_interval_s`` and by :meth:`SubscriberRunner.refresh_metrics`).

    ``lag`` is entries not yet delivered to the group and ``pending`` entries delivered but not
    acknowledged, summed over the runner's shards for the whole group (all its consumers)."""

    group: str
    consumer: str
    delivered: int = 0
    acked: int = 0
    failures: int = 0
    transient_failures: int = 0
    redeliveries: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    nogroup_recoveries: int = 0
    redis_outages: int = 0
    lag: int | None = None
    pending: int | None = None
    retry_queue: int = 0
    batch_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def record_batch(self, ms: float) -> None:
        self.batches += 1
        self.batch_ms.append(ms)

    def batch_latency(self) -> dict[str, float]:
        data = sorted(self.batch_ms)
        if not data:
            return {}
        return {
            "last_ms": self.batch_ms[-1],
            "p50_ms": statistics.median(data),
            "p99_ms": data[min(len(data) - 1, int(len(data) * 0.99))],
            "max_ms": data[-1],
        }

    def snapshot(self) -> dict[str, Any]:
        """A plain dict (JSON-friendly) for logs, ``/metrics`` exporters and tests."""
        out = {k: v for k, v in self.__dict__.items() if k != "batch_ms"}
        out["batch_latency"] = self.batch_latency()
        return out
