"""Prometheus metrics of one API process, in a registry of its own (several apps may share a
process in tests without clashing)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from eventcore._log import EventLog
    from eventcore.server._hub import Hub

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

logger = logging.getLogger("eventcore.server")

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("eventcore_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "eventcore_http_request_seconds", "HTTP request latency (streams excluded)",
            ["method", "route"], buckets=_LATENCY, registry=r)
        self.sse_clients = Gauge("eventcore_sse_clients", "Connected SSE clients", registry=r)
        self.sse_events = Counter("eventcore_sse_events_sent", "Envelopes sent over SSE",
                                  registry=r)
        self.sse_closed_slow = Counter(
            "eventcore_sse_slow_closed", "SSE clients closed because they stopped reading",
            registry=r)
        self.hub_lag = Histogram("eventcore_hub_lag_seconds",
                                 "Append to hub fan-out delay (live path)",
                                 buckets=_LATENCY, registry=r)
        self.hub_watched = Gauge("eventcore_hub_watched_sessions", "Sessions the hub watches",
                                 registry=r)
        self.hub_lagged = Gauge("eventcore_hub_lagged_clients",
                                "Clients moved to catch-up reads (buffer overflow), in total",
                                registry=r)
        self.hub_resyncs = Gauge("eventcore_hub_resyncs",
                                 "Live-path (re)connections that forced a re-read, in total",
                                 registry=r)
        self.append_seconds = Histogram("eventcore_append_seconds",
                                        "Append latency of API writes (inputs, signals, ...)",
                                        ["type"], buckets=_LATENCY, registry=r)
        self.subscriber_lag = Gauge(
            "eventcore_subscriber_lag", "Feed entries not yet delivered to a consumer group",
            ["group"], registry=r)

    def observe_request(self, method: str, route: str, status: int, seconds: float,
                        streaming: bool) -> None:
        self.requests.labels(method, route, str(status)).inc()
        if not streaming:
            self.request_seconds.labels(method, route).observe(seconds)

    def bind_hub(self, hub: Hub) -> None:
        self.hub_watched.set_function(lambda: float(hub.watched))
        self.hub_lagged.set_function(lambda: float(hub.stats.lagged_clients))
        self.hub_resyncs.set_function(lambda: float(hub.stats.resyncs))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def poll_subscriber_lag(
        self, log: EventLog, every_s: float = 5.0, *, task_status: TaskStatus[None]
    ) -> None:
        """Sum each consumer group's lag over the shard feeds (``XINFO GROUPS``; Redis 7 reports
        ``lag``, 6.2 only ``pending``, which is then used)."""
        task_status.started()
        while True:
            try:
                totals: dict[str, int] = {}
                async with log.redis.pipeline(transaction=False) as pipe:
                    for shard in log.keys.all_shards():
                        pipe.xinfo_groups(log.keys.feed(shard))
                    results = await pipe.execute(raise_on_error=False)
                for groups in results:
                    if isinstance(groups, BaseException):
                        continue  # no feed yet
                    for g in groups:
                        name = _text(g.get("name"))
                        lag = g.get("lag")
                        value = lag if isinstance(lag, int) else int(g.get("pending") or 0)
                        totals[name] = totals.get(name, 0) + value
                for name, value in totals.items():
                    self.subscriber_lag.labels(name).set(value)
            except Exception as exc:  # metrics must never take the process down
                logger.debug("subscriber lag poll failed: %s", exc)
            await anyio.sleep(every_s)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


Observe = Callable[[str, str, int, float, bool], None]
