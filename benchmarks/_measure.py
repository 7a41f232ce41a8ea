"""Shared by the benchmarks: percentiles, medians of several runs, timed producer tasks."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float, *, empty: float = float("nan")) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (``empty`` when there are none)."""
    if not values:
        return empty
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pct_ms(seconds: Sequence[float], q: float) -> float:
    """:func:`percentile` of durations in seconds, in milliseconds (0.0 when there are none,
    so the JSON stays valid)."""
    return round(percentile(seconds, q, empty=0.0) * 1000, 3)


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' JSON reports merged: every number the median of the runs', nested reports
    alike, anything else as the first run had it."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = median_of_runs([r[key] for r in runs])
        elif isinstance(value, int | float):
            out[key] = round(statistics.median(r[key] for r in runs), 3)
        else:
            out[key] = value
    return out


async def timed_producers(
    count: int, per: int, step: Callable[[int, int], Awaitable[int]]
) -> tuple[float, list[float]]:
    """Run ``count`` tasks, each calling ``step(producer, i)`` ``per`` times; time each call.
    ``step`` returns how many events the call wrote (its latency is counted once per event).
    Returns the elapsed seconds and the latencies."""
    latencies: list[float] = []
    clock = time.perf_counter

    async def producer(p: int) -> None:
        local: list[float] = []
        for i in range(per):
            t0 = clock()
            n = await step(p, i)
            local += [clock() - t0] * n
        latencies.extend(local)

    start = clock()
    async with asyncio.TaskGroup() as tg:
        for p in range(count):
            tg.create_task(producer(p))
    return clock() - start, latencies
