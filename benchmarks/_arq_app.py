"""The arq side of benchmarks/dispatch.py: a no-op job that only records its completion (one
XADD), run by ``arq _arq_app.WorkerSettings``."""

from __future__ import annotations

import os
import time
from typing import Any

from arq.connections import RedisSettings

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def noop(ctx: dict[str, Any], i: int, sent: float) -> None:
    await ctx["redis"].xadd("bench:done", {"i": i, "sent": sent, "at": time.time()})


class WorkerSettings:
    functions = [noop]
    redis_settings = RedisSettings.from_dsn(URL)
    max_jobs = int(os.environ.get("BENCH_CONCURRENCY", "1000"))
    poll_delay = 0.01  # default 0.5 s would dominate; poll as eagerly as is reasonable
    keep_result = 0
    handle_signals = True
