"""Shared by the worker benchmarks: worker processes, RSS, counting events on the feeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import psutil

from eventcore import EventLog

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def spawn(args: list[str], env: dict[str, str], *, pipe: bool = False
          ) -> subprocess.Popen[str]:
    """A process in this directory; ``pipe``: its stdout is read (else discarded, so a chatty
    process never blocks on a full pipe)."""
    return subprocess.Popen(args, cwd=HERE, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def worker_env(log: EventLog, **extra: str) -> dict[str, str]:
    s = log.settings
    return {"EVENTCORE_REDIS_URL": str(s.redis_url), "EVENTCORE_NAMESPACE": s.namespace,
            "EVENTCORE_SHARDS": str(s.shards), **extra}


def eventcore_worker(log: EventLog, *args: str, **env: str) -> subprocess.Popen[str]:
    return spawn([str(BIN / "eventcore"), "worker", "_worker_agents:app", "--log-level",
                  "WARNING", *args], worker_env(log, **env), pipe=True)


async def ready(proc: subprocess.Popen[str], within: float = 120.0) -> dict[str, Any]:
    """Wait for the worker's JSON ``ready`` line; a worker that is not ready ``within`` s is
    killed and the wait fails (a benchmark never hangs)."""
    assert proc.stdout is not None
    out = proc.stdout

    def wait() -> dict[str, Any]:
        for line in out:
            data = json.loads(line)
            if data.get("event") == "ready":
                return dict(data)
        raise RuntimeError(f"the worker exited (code {proc.poll()}) before it was ready")

    try:
        with anyio.fail_after(within):
            return await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"the worker was not ready after {within} s") from None


async def stop(proc: subprocess.Popen[str], within: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited ``within`` s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        await anyio.to_thread.run_sync(proc.wait, within)
    except subprocess.TimeoutExpired:
        proc.kill()
        await anyio.to_thread.run_sync(proc.wait)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return rss_mb(pid)


class FeedCounter:
    """Reads every shard feed of a log from the start and calls ``on`` for each entry
    ``(session_id, type, arrival time)``; one blocking XREAD over all shards. ``raw``: on a
    connection of its own whose XREAD replies are not parsed into dicts (a single-node URL
    only), so the measuring costs the measured client less."""

    def __init__(self, log: EventLog, on: Callable[[str, str, float], None], *,
                 raw: bool = False) -> None:
        self.log = log
        self.on = on
        self.raw = raw

    async def run(self, until: Callable[[], bool]) -> None:
        if self.raw:
            await self._run_raw(until)
            return
        keys = self.log.keys
        last: dict[Any, Any] = {keys.feed(s): "0-0" for s in keys.all_shards()}
        while not until():
            got = await self.log.redis.xread(last, count=5000, block=200)
            now = time.time()
            for stream, entries in got or ():
                for _eid, fields in entries:
                    self.on(fields[b"sid"].decode(), fields[b"t"].decode(), now)
                last[stream.decode() if isinstance(stream, bytes) else stream] = entries[-1][0]

    async def _run_raw(self, until: Callable[[], bool]) -> None:
        keys = self.log.keys
        feeds = [keys.feed(s) for s in keys.all_shards()]
        last = ["0-0"] * len(feeds)
        at = {f.encode(): i for i, f in enumerate(feeds)}
        r = raw_reader(str(self.log.settings.redis_url))
        on = self.on
        try:
            while not until():
                got = await r.execute_command("XREAD", "COUNT", 5000, "BLOCK", 200, "STREAMS",
                                              *feeds, *last)
                now = time.time()
                for stream, entries in got or ():
                    for _eid, fields in entries:
                        sid = typ = None
                        for i in range(0, len(fields), 2):
                            name = fields[i]
                            if name == b"sid":
                                sid = fields[i + 1]
                            elif name == b"t":
                                typ = fields[i + 1]
                                break
                        if sid is not None and typ is not None:
                            on(sid.decode(), typ.decode(), now)
                    last[at[stream]] = entries[-1][0]
        finally:
            await r.aclose()


def raw_reader(url: str) -> Any:
    """A client of ``url`` whose XREAD replies stay as Redis sent them (lists, not dicts)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    r.response_callbacks.pop("XREAD", None)
    return r


async def create_many(log: EventLog, agent: str, n: int, *, parallel: int = 256,
                      input: Any = None, labels: dict[str, str] | None = None,
                      created: list[str] | None = None) -> list[str]:
    """``n`` sessions, ``parallel`` at a time; each id is also appended to ``created`` as soon
    as it exists (progress for whoever waits)."""
    sids: list[str] = [""] * n
    lock = anyio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with lock:
            sids[i] = (await log.create_session(agent, input=input, labels=labels)).session_id
            if created is not None:
                created.append(sids[i])

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return sids


def median(values: Iterable[float]) -> float:
    import statistics

    return statistics.median(list(values))
