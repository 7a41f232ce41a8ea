"""The taskiq side of benchmarks/dispatch.py: a no-op task on taskiq-redis's stream broker that
only records its completion (one XADD), run by ``taskiq worker _taskiq_app:broker``."""

from __future__ import annotations

import os
import time

import redis.asyncio as aioredis
from taskiq_redis import RedisStreamBroker

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# consumer_id "0": the group starts at the beginning, so a backlog kicked before the worker
# started is consumed (the default "$" would skip it)
broker = RedisStreamBroker(URL, queue_name="bench:taskiq", consumer_group_name="bench",
                           consumer_id="0", xread_count=1000)
_done = aioredis.Redis.from_url(URL)


@broker.task(task_name="noop")
async def noop(i: int, sent: float) -> None:
    await _done.xadd("bench:done", {"i": i, "sent": sent, "at": time.time()})
