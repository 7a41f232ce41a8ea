"""Worker metrics: plain counters the worker updates, exported to Prometheus on collect."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["WorkerMetrics"]

_PREFIX = "eventcore_worker"


class WorkerMetrics:
    """What a worker is doing. Read the attributes directly (tests, the CLI) or scrape
    :attr:`registry` (Prometheus). Each worker has its own registry, so several workers in one
    process do not collide."""

    def __init__(self, worker_id: str, max_sessions: int) -> None:
        self.worker_id = worker_id
        self.max_sessions = max_sessions
        self.active = 0
        self.claims = 0
        self.reclaims = 0
        self.claims_not_replicated = 0
        self.retries = 0
        self.dead_lettered = 0
        self.completed = 0
        self.cancelled = 0
        self.timed_out = 0
        self.unloaded = 0
        self.handed_back = 0
        self.lost = 0
        self.fenced_writes = 0
        self.resurrected_leases = 0
        self.presence_checks = 0
        self.presence_errors = 0
        self.evictions = 0
        self.takeovers = 0
        self.consecutive_failures = 0
        self.loop_lag_s = 0.0
        self.max_loop_lag_s = 0.0
        self.heartbeats = 0
        self.max_heartbeat_gap_s = 0.0
        self.last_renew_s = 0.0
        self.max_renew_s = 0.0
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        self.lease_renew = Histogram(
            f"{_PREFIX}_lease_renew_seconds",
            "Time to renew all of the worker's session leases (one heartbeat)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    @property
    def load(self) -> float:
        """active / max_sessions: 1.0 means the worker takes no more sessions."""
        return self.active / self.max_sessions if self.max_sessions else 1.0

    def observe_renew(self, seconds: float, gap_s: float) -> None:
        """Called from the heartbeat thread."""
        self.lease_renew.observe(seconds)
        with self._lock:
            self.heartbeats += 1
            self.last_renew_s = seconds
            self.max_renew_s = max(self.max_renew_s, seconds)
            self.max_heartbeat_gap_s = max(self.max_heartbeat_gap_s, gap_s)

    def observe_lag(self, seconds: float) -> None:
        with self._lock:
            self.loop_lag_s = seconds
            self.max_loop_lag_s = max(self.max_loop_lag_s, seconds)

    def snapshot(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items()
               if not k.startswith("_") and k not in ("registry", "lease_renew")}
        out["load"] = self.load
        return out


_COUNTERS = {
    "claims": "Sessions claimed (new dispatch entries and reclaims)",
    "reclaims": "Sessions reclaimed from a worker whose lease expired",
    "claims_not_replicated": "Claim batches not hosted because too few replicas confirmed "
                             "them (EVENTCORE_APPEND_REPLICAS): claimed again",
    "retries": "Handler failures scheduled for a retry",
    "dead_lettered": "Sessions failed for good and dead-lettered",
    "completed": "Sessions whose handler returned",
    "cancelled": "Sessions ended by a cancel request",
    "timed_out": "Sessions ended by their session timeout",
    "unloaded": "Idle sessions unloaded",
    "handed_back": "Sessions handed back to the pool on drain",
    "lost": "Sessions this worker stopped hosting because another host took over",
    "fenced_writes": "Writes refused because this worker's host epoch was superseded",
    "resurrected_leases": "Lapsed leases taken back because nobody had re-hosted the session",
    "heartbeats": "Heartbeats (lease renewals of all hosted sessions)",
    "presence_checks": "Checks of the other workers' presence connections",
    "presence_errors": "Presence checks that failed (nobody is evicted on a failed check)",
    "evictions": "Workers found dead (their presence connection closed) by this worker",
    "takeovers": "Sessions of dead workers taken over without waiting for their leases",
}
_GAUGES = {
    "active": "Sessions hosted now",
    "load": "active / max concurrent sessions",
    "max_sessions": "Most sessions this worker hosts at once",
    "consecutive_failures": "Consecutive failed iterations (the supervisor exits at its limit)",
    "loop_lag_s": "Event loop lag last measured by the heartbeat thread (seconds)",
    "max_loop_lag_s": "Largest event loop lag measured (seconds)",
    "max_heartbeat_gap_s": "Longest time between two lease renewals (seconds)",
    "last_renew_s": "Time the last heartbeat took to renew every lease (seconds)",
}


class _Collector(Collector):
    def __init__(self, m: WorkerMetrics) -> None:
        self._m = m

    def collect(self) -> Iterator[Any]:
        snap = self._m.snapshot()
        labels = ["worker"]
        for name, doc in _COUNTERS.items():
            c = CounterMetricFamily(f"{_PREFIX}_{name}", doc, labels=labels)
            c.add_metric([self._m.worker_id], float(snap[name]))
            yield c
        for name, doc in _GAUGES.items():
            g = GaugeMetricFamily(f"{_PREFIX}_{name.removesuffix('_s')}"
                                  + ("_seconds" if name.endswith("_s") else ""), doc,
                                  labels=labels)
            g.add_metric([self._m.worker_id], float(snap[name]))
            yield g
