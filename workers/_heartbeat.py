"""The heartbeat: renews session leases from a thread of its own, so a handler that hogs the
worker's event loop (CPU-bound code, a blocking call) cannot let leases lapse.

The thread runs its own asyncio loop and Redis connection. Python switches threads at least
every ``sys.getswitchinterval()`` (5 ms) even while another thread runs pure-Python code, and
blocking calls release the GIL, so the renewal keeps its schedule; the thread also measures the
main loop's lag by timing a callback it schedules there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import redis.asyncio as aioredis

from eventcore import Keys
from eventcore._redis import Redis, connect_cluster, is_cluster, run_scripts

from ._metrics import WorkerMetrics
from ._scripts import GROUP, load_script

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["Heartbeat", "LeaseRec"]

log = logging.getLogger("workers")
HEARTBEAT_LUA = load_script("heartbeat")
_CHUNK = 200  # leases per script call
# Script calls per round trip. While a handler holds the GIL, each hand-off of it to this
# thread and back (one per awaited round trip) costs up to a switch interval (5 ms): pipelining
# the calls makes a beat of 20,000 leases a few round trips instead of a hundred.
_CALLS_PER_TRIP = 50


@dataclass(frozen=True, slots=True)
class LeaseRec:
    session_id: str
    shard: int
    epoch: int
    entry_id: str
    meta: str  # the session's key names (built once, not on every beat)
    lease: str


async def thread_client(redis: Redis) -> Redis:
    """A client of its own (for another thread's event loop) to the same server; on Redis
    Cluster a cluster client of its own seeded with every node ``redis`` knows (a pipeline of
    it runs on the nodes of its keys' slots: one round trip per master)."""
    if is_cluster(redis):
        kw = redis.connection_kwargs  # type: ignore[attr-defined]
        nodes = [n.name for n in redis.get_nodes()]  # type: ignore[attr-defined]
        user, password = kw.get("username"), kw.get("password")
        auth = (f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
                if password else "")
        scheme = "rediss" if kw.get("ssl") or "SSL" in kw["connection_class"].__name__ \
            else "redis"
        return await connect_cluster(
            f"{scheme}://{auth}{nodes[0]}", nodes[1:],
            retry_budget_s=getattr(redis, "retry_budget_s", 15.0), max_connections=4,
            sharded_pubsub=getattr(redis, "sharded_pubsub", None))
    pool = redis.connection_pool
    new = aioredis.ConnectionPool(connection_class=pool.connection_class, max_connections=4,
                                  **pool.connection_kwargs)
    return aioredis.Redis.from_pool(new)


class Heartbeat:
    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        worker_id: str,
        lease_ttl_s: float,
        interval_s: float,
        leases: Callable[[], list[LeaseRec]],
        on_lost: Callable[[list[LeaseRec]], None],
        on_fatal: Callable[[BaseException], None],
        status: Callable[[], dict[str, Any]],
        metrics: WorkerMetrics,
        loop: asyncio.AbstractEventLoop,
        max_failures: int,
    ) -> None:
        self._redis_template = redis
        self._keys = keys
        self._id = worker_id
        self._ttl_ms = int(lease_ttl_s * 1000)
        self._interval_s = interval_s
        self._leases = leases
        self._on_lost = on_lost
        self._on_fatal = on_fatal
        self._status = status
        self._metrics = metrics
        self._loop = loop
        self._max_failures = max_failures
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe_sent: float | None = None
        self._started_at = int(time.time() * 1000)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"heartbeat-{self._id}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop and wait for it (a blocking call: run it in a thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _main(self) -> None:
        asyncio.run(self._beat_forever())

    async def _beat_forever(self) -> None:
        try:
            client = await thread_client(self._redis_template)
        except Exception as exc:
            log.warning("heartbeat could not connect: %s", exc)
            self._call_main(self._on_fatal, exc)
            return
        script: AsyncScript = client.register_script(HEARTBEAT_LUA)
        failures = 0
        last_ok = time.monotonic()
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                self._probe_lag(t0)
                try:
                    await self._beat(client, script)
                    failures = 0
                    done = time.monotonic()
                    self._metrics.observe_renew(done - t0, done - last_ok)
                    last_ok = done
                except Exception as exc:
                    failures += 1
                    log.warning("heartbeat failed (%d in a row): %s", failures, exc)
                    if failures >= self._max_failures:
                        self._call_main(self._on_fatal, exc)
                        return
                while not self._stop.is_set():
                    left = self._interval_s - (time.monotonic() - t0)
                    if left <= 0:
                        break
                    self._probe_lag(time.monotonic())
                    await asyncio.sleep(min(left, 0.05))
        finally:
            if self._stop.is_set():  # a clean stop: leave the membership registry at once
                with contextlib.suppress(Exception):
                    await client.delete(self._keys.worker(self._id))
                    await client.zrem(self._keys.workers(), self._id)
            await client.aclose()

    def _call_main(self, fn: Callable[..., None], *args: Any) -> None:
        # RuntimeError: the worker's loop is closed, nothing left to tell it
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _probe_lag(self, now: float) -> None:
        """Schedule a callback on the worker's loop; its delay is the loop's lag. While it is
        outstanding its age is the lag so far (a hogged loop shows a growing lag)."""
        sent = self._probe_sent
        if sent is None:
            self._probe_sent = now
            self._call_main(self._probe_done, now)
        else:
            self._metrics.observe_lag(now - sent)

    def _probe_done(self, sent: float) -> None:
        self._metrics.observe_lag(time.monotonic() - sent)
        self._probe_sent = None

    async def _beat(self, client: Redis, script: AsyncScript) -> None:
        by_shard: dict[int, list[LeaseRec]] = {}
        for rec in self._leases():
            by_shard.setdefault(rec.shard, []).append(rec)
        chunks = [recs[start:start + _CHUNK] for recs in by_shard.values()
                  for start in range(0, len(recs), _CHUNK)]
        lost: list[LeaseRec] = []
        for first in range(0, len(chunks), _CALLS_PER_TRIP):
            trip = chunks[first:first + _CALLS_PER_TRIP]
            calls = []
            for chunk in trip:
                keys = [self._keys.dispatch(chunk[0].shard)]
                args: list[Any] = [self._id, self._ttl_ms, GROUP]
                for r in chunk:
                    keys += (r.meta, r.lease)
                    args += (r.epoch, r.entry_id)
                calls.append((keys, args))
            # renewing twice is harmless: the batch may be sent again
            for chunk, codes in zip(trip, await run_scripts(client, script, calls),
                                    strict=True):
                for r, code in zip(chunk, codes, strict=True):
                    if code == 1:
                        lost.append(r)
                    elif code == 2:
                        self._metrics.resurrected_leases += 1
        if lost:
            self._call_main(self._on_lost, lost)
        status = self._status()
        now = int(time.time() * 1000)
        async with client.pipeline(transaction=False) as pipe:
            wk = self._keys.worker(self._id)
            pipe.hset(wk, mapping={
                "pid": os.getpid(), "host": socket.gethostname(), "started_at": self._started_at,
                "heartbeat_at": now, **status,
            })
            pipe.pexpire(wk, self._ttl_ms * 3)
            pipe.zadd(self._keys.workers(), {self._id: now})
            await pipe.execute()
