"""Density: how many concurrently hosted sessions fit in one worker process, and what they cost.

Run: ``.venv/bin/python benchmarks/density.py [--sessions 10000] [--baseline-processes 10]``.
Spawns its own redis-server and, in one run:

``eventcore``   one ``eventcore worker`` process hosts N idle-ish sessions (each answered one
                input in a run and waits for the next): its RSS before and after, its peak RSS
                (VmHWM) and the memory per session; the heartbeat renewing all N leases (ms per
                renewal); then a handler blocks the event loop with CPU work for longer than the
                lease TTL, and we report the heartbeat's longest gap, the loop lag the heartbeat
                thread measured, and whether any of the N leases lapsed (a session re-hosted).
``process_per_session``  the model the coroutine pool replaces: K worker processes hosting one
                session each (the same code, ``--concurrency 1``); RSS per session and the ratio.

Prints JSON. Target: N = 10,000 sessions in < 1 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import anyio
import httpx
from _workers_common import (
    FeedCounter,
    create_many,
    eventcore_worker,
    peak_rss_mb,
    ready,
    rss_mb,
    stop,
)
from prometheus_client.parser import text_string_to_metric_families

from eventcore import Envelope, EventLog, load_settings
from eventcore.testing._server import RedisServer, free_port

TARGET_MB = 1024.0


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("eventcore_worker")}


async def wait_for(pred: Any, *, every: float = 0.2, limit: float = 600) -> None:
    with anyio.fail_after(limit):
        while not pred():  # noqa: ASYNC110 - polling the worker's metrics endpoint
            await anyio.sleep(every)


async def eventcore_density(url: str, n: int, lease_ttl: float, hog_s: float) -> dict[str, Any]:
    settings = load_settings(redis_url=url, namespace="density", shards=16, pool_size=64)
    async with EventLog(settings) as log:
        port = free_port()
        proc = eventcore_worker(log, "-c", str(n + 10), "--lease-ttl", str(lease_ttl),
                                "--idle-timeout", "36000", "--poll-interval", "60",
                                "--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
        try:
            await ready(proc)
            await anyio.sleep(1)
            idle_rss = rss_mb(proc.pid)
            replied: set[str] = set()

            def on(sid: str, typ: str, _: float) -> None:
                if typ == "message":
                    replied.add(sid)

            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(FeedCounter(log, on).run, lambda: len(replied) >= n)
                sids = await create_many(log, "idle", n, input={"text": "hello"})
                created_s = time.monotonic() - t0
            hosted_s = time.monotonic() - t0
            await wait_for(lambda: scrape(port)["eventcore_worker_active"] >= n)
            # let a few heartbeats renew all N leases
            before = scrape(port)["eventcore_worker_heartbeats_total"]
            await wait_for(lambda: scrape(port)["eventcore_worker_heartbeats_total"] >= before + 3)
            m = scrape(port)
            hosting_rss = rss_mb(proc.pid)
            renew = {
                "leases": n, "interval_s": round(lease_ttl / 3, 3),
                "last_renewal_ms": round(m["eventcore_worker_last_renew_seconds"] * 1000, 1)
                if "eventcore_worker_last_renew_seconds" in m else None,
                "mean_renewal_ms": round(1000 * m["eventcore_worker_lease_renew_seconds_sum"]
                                         / m["eventcore_worker_lease_renew_seconds_count"], 1),
                "max_gap_between_renewals_s": round(
                    m["eventcore_worker_max_heartbeat_gap_seconds"], 3),
            }
            # a handler hogs the event loop for longer than the lease TTL
            hog = (await log.create_session("hog", labels={"hog_s": str(hog_s)})).session_id
            await log.append(Envelope(type="input", session_id=hog, payload="go"))
            done: set[str] = set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(FeedCounter(log, lambda s, t, _: done.add(s)
                                          if t == "run.completed" else None).run,
                              lambda: hog in done)
            m = scrape(port)
            epochs = []
            for start in range(0, n, 1000):
                async with log.redis.pipeline(transaction=False) as pipe:
                    for sid in sids[start:start + 1000]:
                        pipe.hget(log.keys.session(sid).meta, "epoch")
                    epochs += await pipe.execute()
            peak = peak_rss_mb(proc.pid)
            return {
                "sessions": n,
                "created_in_s": round(created_s, 2),
                "all_hosted_and_replied_in_s": round(hosted_s, 2),
                "rss_idle_worker_mb": round(idle_rss, 1),
                "rss_hosting_mb": round(hosting_rss, 1),
                "peak_rss_mb": round(peak, 1),
                "per_session_kb": round((hosting_rss - idle_rss) * 1024 / n, 2),
                "target_peak_rss_mb": TARGET_MB,
                "meets_target": peak < TARGET_MB,
                "heartbeat": renew,
                "hog": {
                    "lease_ttl_s": lease_ttl,
                    "loop_blocked_s": hog_s,
                    "max_loop_lag_measured_s": round(
                        m["eventcore_worker_max_loop_lag_seconds"], 3),
                    "max_gap_between_renewals_s": round(
                        m["eventcore_worker_max_heartbeat_gap_seconds"], 3),
                    "sessions_rehosted": sum(1 for e in epochs if e != b"1"),
                    "leases_lost": m["eventcore_worker_lost_total"],
                },
            }
        finally:
            await stop(proc)


async def process_per_session(url: str, k: int) -> dict[str, Any]:
    settings = load_settings(redis_url=url, namespace="perprocess", shards=16)
    async with EventLog(settings) as log:
        procs = [eventcore_worker(log, "-c", "1", "--idle-timeout", "36000") for _ in range(k)]
        try:
            for p in procs:
                await ready(p)
            replied: set[str] = set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(FeedCounter(log, lambda s, t, _: replied.add(s)
                                          if t == "message" else None).run,
                              lambda: len(replied) >= k)
                await create_many(log, "idle", k, input={"text": "hello"})
            total = sum(rss_mb(p.pid) for p in procs)
            return {"processes": k, "sessions": k, "rss_total_mb": round(total, 1),
                    "rss_per_session_mb": round(total / k, 1)}
        finally:
            for p in procs:
                await stop(p)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--baseline-processes", type=int, default=10)
    ap.add_argument("--lease-ttl", type=float, default=5.0)
    ap.add_argument("--hog-s", type=float, default=8.0)
    args = ap.parse_args()
    with RedisServer(appendonly=False) as server:
        ours = await eventcore_density(server.url, args.sessions, args.lease_ttl, args.hog_s)
        base = await process_per_session(server.url, args.baseline_processes)
    per_session_mb = ours["per_session_kb"] / 1024
    out = {
        "benchmark": "density",
        "eventcore": ours,
        "process_per_session": base,
        "ratio_memory_per_session_process_vs_coroutine": round(
            base["rss_per_session_mb"] / per_session_mb, 1) if per_session_mb > 0 else None,
        "process_per_session_rss_for_n_sessions_gb_estimate": round(
            base["rss_per_session_mb"] * args.sessions / 1024, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    anyio.run(main)
