"""Scheduler firing accuracy under load: N minutely schedules, P scheduler processes on the
real clock, one occurrence (the next minute boundary) in which all N fire together.

Run: ``.venv/bin/python benchmarks/schedules.py [--schedules N] [--processes P]
[--interval S]``. Spawns its own redis-server (AOF, ``appendfsync everysec``). Waits for the
next minute boundary (up to a minute), then reports, from each started session's
``created_at`` minus its occurrence: lag p50 / p99 / max (ms), the time from the boundary until
the last of the N sessions existed, the sessions per second the P processes started, and
whether every schedule fired exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import anyio
from _measure import percentile

from eventcore import EventLog, load_settings
from eventcore.schedules import Scheduler, Schedules, occurrence_session_id
from eventcore.testing._server import RedisServer


def _pct(values: list[float], q: float) -> float:
    return round(percentile(values, q), 1)


async def child(url: str, namespace: str, interval: float) -> None:
    settings = load_settings(redis_url=url, namespace=namespace)
    async with EventLog(settings) as log, Scheduler(log, interval_s=interval):
        print("ready", flush=True)
        await anyio.sleep_forever()


def _spawn(processes: int, url: str, ns: str, interval: float) -> list[subprocess.Popen[str]]:
    procs = [subprocess.Popen([sys.executable, __file__, "--child", url, ns, str(interval)],
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return procs


async def main(n: int, processes: int, interval: float) -> dict[str, object]:
    with RedisServer(appendfsync="everysec") as server:
        ns = f"b{os.urandom(4).hex()}"
        settings = load_settings(redis_url=server.url, namespace=ns)
        async with EventLog(settings) as log:
            store = Schedules(log)
            for i in range(n):
                await store.create(f"s{i}", cron="* * * * *", agent="echo")
            first = (await store.get("s0")).next_run_at
            assert first is not None
            boundary = first.timestamp()
            if boundary - time.time() < 5:  # too close to start the processes: the next one
                raise SystemExit("started too close to a minute boundary; run again")
            procs = _spawn(processes, server.url, ns, interval)
            try:
                while True:
                    fired = sum(s.fired for s in await store.list())
                    if fired >= n:
                        break
                    await anyio.sleep(0.2)
                occ_ms = int(boundary * 1000)
                lags = []
                for i in range(n):
                    info = await log.get_session(occurrence_session_id(log.keys, f"s{i}",
                                                                       occ_ms))
                    assert info.created_at is not None
                    lags.append((info.created_at.timestamp() - boundary) * 1000)
                once = all(s.fired == 1 for s in await store.list())
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    span = max(lags) / 1000
    return {"schedules": n, "processes": processes, "interval_s": interval,
            "lag_p50_ms": _pct(lags, 0.5), "lag_p99_ms": _pct(lags, 0.99),
            "lag_max_ms": round(max(lags), 1), "all_started_after_s": round(span, 3),
            "sessions_per_s": round(n / span) if span > 0 else None,
            "exactly_once": once}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        anyio.run(child, sys.argv[2], sys.argv[3], float(sys.argv[4]))
        raise SystemExit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedules", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0)
    a = ap.parse_args()
    print(json.dumps(anyio.run(main, a.schedules, a.processes, a.interval), indent=2))
