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

Prints JSON. Targets: peak RSS < 1 GB for 10,000 sessions, < 2 GB for 20,000 (1 GB per 10,000,
never less than 1 GB); exit code 1 when one is missed or not every session was answered.

Every wait is bounded: a wait that sees no progress for ``--stall-s`` (or exceeds its overall
limit, which grows with N) fails at once with the counts -- sessions created, claimed, hosted
and answered, the dispatch streams' undelivered (lag) and pending entries -- and the JSON says
so (``"error"``), exit code 2. The benchmark never hangs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
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

MB_PER_10K = 1024.0
GROUP = "workers"


def target_mb(n: int) -> float:
    return MB_PER_10K * max(1.0, n / 10_000)


class Stalled(RuntimeError):
    def __init__(self, message: str, counts: dict[str, Any]) -> None:
        super().__init__(message)
        self.counts = counts


def _scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("eventcore_worker")}


class Watch:
    """One worker process and what it has done: the replies seen on the shard feeds, its
    metrics, the dispatch streams. :meth:`until` is the only way this benchmark waits."""

    def __init__(self, log: EventLog, proc: subprocess.Popen[str], port: int | None,
                 *, stall_s: float) -> None:
        self.log, self.proc, self.port, self.stall_s = log, proc, port, stall_s
        self.created: list[str] = []
        self.replied: set[str] = set()
        self.completed: set[str] = set()

    def on_feed(self, sid: str, typ: str, _: float) -> None:
        if typ == "message":
            self.replied.add(sid)
        elif typ == "run.completed":
            self.completed.add(sid)

    async def metrics(self) -> dict[str, float]:
        if self.port is None:
            return {}
        port = self.port
        return await anyio.to_thread.run_sync(lambda: _scrape(port))

    async def dispatch(self) -> dict[str, int | None]:
        """Undelivered entries (XINFO GROUPS lag) and pending ones, over every shard."""
        keys, lag, pending = self.log.keys, 0, 0
        async with self.log.redis.pipeline(transaction=False) as pipe:
            for shard in keys.all_shards():
                pipe.xinfo_groups(keys.dispatch(shard))
            for groups in await pipe.execute():
                for g in groups:
                    if g["name"] in (GROUP, GROUP.encode()):
                        pending += int(g["pending"])
                        lag = None if lag is None or g.get("lag") is None else lag + g["lag"]
        return {"lag": lag, "pending": pending}

    async def counts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"created": len(self.created), "answered": len(self.replied),
                               "worker_exit_code": self.proc.poll()}
        try:
            m = await self.metrics()
            if m:
                out.update(claimed=int(m["eventcore_worker_claims_total"]),
                           hosted=int(m["eventcore_worker_active"]),
                           reclaimed=int(m["eventcore_worker_reclaims_total"]),
                           lost=int(m["eventcore_worker_lost_total"]))
            out.update(await self.dispatch())
        except Exception as exc:  # the counts of a failure must not fail themselves
            out["counts_error"] = repr(exc)
        return out

    async def until(self, what: str, done: Callable[[], bool], *, limit: float,
                    every: float = 0.5) -> float:
        """Wait for ``done()``; fail loudly (with the counts) if the worker exits, if nothing
        moves for ``stall_s``, or after ``limit`` s. Returns the seconds waited."""
        t0 = last_change = time.monotonic()
        last: dict[str, Any] | None = None
        while not done():
            now = time.monotonic()
            counts = await self.counts()
            moving = {k: v for k, v in counts.items() if k != "worker_exit_code"}
            if moving != last:
                last, last_change = moving, now
            why = None
            if self.proc.poll() is not None:
                why = f"the worker exited with code {self.proc.poll()}"
            elif now - last_change > self.stall_s:
                why = f"no progress for {self.stall_s:.0f} s"
            elif now - t0 > limit:
                why = f"not done after {limit:.0f} s"
            if why is not None:
                raise Stalled(f"{what}: {why}", counts)
            await anyio.sleep(every)
        return time.monotonic() - t0


async def eventcore_density(url: str, n: int, lease_ttl: float, hog_s: float,
                            stall_s: float) -> dict[str, Any]:
    settings = load_settings(redis_url=url, namespace="density", shards=16, pool_size=64)
    limit = 120 + n / 20  # generous: 20 sessions/s would be 10x slower than this VM's worst
    async with EventLog(settings) as log:
        port = free_port()
        proc = eventcore_worker(log, "-c", str(n + 10), "--lease-ttl", str(lease_ttl),
                                "--idle-timeout", "36000", "--poll-interval", "60",
                                "--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
        watch = Watch(log, proc, port, stall_s=stall_s)
        try:
            await ready(proc)
            await anyio.sleep(1)  # let the fresh process settle before the baseline RSS
            idle_rss = rss_mb(proc.pid)
            async with anyio.create_task_group() as tg:
                tg.start_soon(FeedCounter(log, watch.on_feed).run, lambda: False)
                t0 = time.monotonic()
                tg.start_soon(lambda: create_many(log, "idle", n, input={"text": "hello"},
                                                  created=watch.created))
                await watch.until("creating", lambda: len(watch.created) >= n, limit=limit)
                created_s = time.monotonic() - t0
                await watch.until("hosting and answering",
                                  lambda: len(watch.replied) >= n, limit=limit)
                hosted_s = time.monotonic() - t0
                sids = list(watch.created)

                # let a few heartbeats renew all N leases
                before = (await watch.metrics())["eventcore_worker_heartbeats_total"]
                beats: dict[str, float] = {}

                def renewed() -> bool:
                    return beats.get("eventcore_worker_heartbeats_total", 0) >= before + 3

                async def poll_beats() -> None:
                    while not renewed():
                        beats.update(await watch.metrics())
                        await anyio.sleep(0.5)

                tg.start_soon(poll_beats)
                await watch.until("renewing the leases", renewed, limit=30 + 10 * lease_ttl)
                m = await watch.metrics()
                hosting_rss = rss_mb(proc.pid)
                renew = {
                    "leases": n, "interval_s": round(lease_ttl / 3, 3),
                    "last_renewal_ms": round(m["eventcore_worker_last_renew_seconds"] * 1000, 1),
                    "mean_renewal_ms": round(1000 * m["eventcore_worker_lease_renew_seconds_sum"]
                                             / m["eventcore_worker_lease_renew_seconds_count"],
                                             1),
                    "max_gap_between_renewals_s": round(
                        m["eventcore_worker_max_heartbeat_gap_seconds"], 3),
                }
                rehosted_before_hog = await rehosted(log, sids)

                # a handler hogs the event loop for longer than the lease TTL
                hog = (await log.create_session("hog", labels={"hog_s": str(hog_s)})).session_id
                await log.append(Envelope(type="input", session_id=hog, payload="go"))
                await watch.until("the loop-hogging handler", lambda: hog in watch.completed,
                                  limit=60 + 3 * hog_s)
                m = await watch.metrics()
                tg.cancel_scope.cancel()
            rehosted_after = await rehosted(log, sids)
            peak = peak_rss_mb(proc.pid)
            return {
                "sessions": n,
                "answered": len(watch.replied & set(sids)),
                "all_answered": len(watch.replied & set(sids)) == n,
                "created_in_s": round(created_s, 2),
                "all_hosted_and_replied_in_s": round(hosted_s, 2),
                "rss_idle_worker_mb": round(idle_rss, 1),
                "rss_hosting_mb": round(hosting_rss, 1),
                "peak_rss_mb": round(peak, 1),
                "per_session_kb": round((hosting_rss - idle_rss) * 1024 / n, 2),
                "per_session_kb_at_peak": round((peak - idle_rss) * 1024 / n, 2),
                "target_peak_rss_mb": target_mb(n),
                "meets_target": peak < target_mb(n),
                "heartbeat": renew,
                "sessions_rehosted_while_hosting": rehosted_before_hog,
                "hog": {
                    "lease_ttl_s": lease_ttl,
                    "loop_blocked_s": hog_s,
                    "max_loop_lag_measured_s": round(
                        m["eventcore_worker_max_loop_lag_seconds"], 3),
                    "max_gap_between_renewals_s": round(
                        m["eventcore_worker_max_heartbeat_gap_seconds"], 3),
                    "sessions_rehosted": rehosted_after - rehosted_before_hog,
                    "leases_lost": m["eventcore_worker_lost_total"],
                },
            }
        finally:
            await stop(proc)


async def rehosted(log: EventLog, sids: list[str]) -> int:
    """How many of the sessions were hosted more than once (host epoch > 1)."""
    epochs: list[Any] = []
    for start in range(0, len(sids), 1000):
        async with log.redis.pipeline(transaction=False) as pipe:
            for sid in sids[start:start + 1000]:
                pipe.hget(log.keys.session(sid).meta, "epoch")
            epochs += await pipe.execute()
    return sum(1 for e in epochs if e != b"1")


async def process_per_session(url: str, k: int, stall_s: float) -> dict[str, Any]:
    settings = load_settings(redis_url=url, namespace="perprocess", shards=16)
    async with EventLog(settings) as log:
        procs = [eventcore_worker(log, "-c", "1", "--idle-timeout", "36000") for _ in range(k)]
        try:
            for p in procs:
                await ready(p)
            watch = Watch(log, procs[0], None, stall_s=stall_s)
            async with anyio.create_task_group() as tg:
                tg.start_soon(FeedCounter(log, watch.on_feed).run, lambda: False)
                tg.start_soon(lambda: create_many(log, "idle", k, input={"text": "hello"},
                                                  created=watch.created))
                await watch.until("process per session: answering",
                                  lambda: len(watch.replied) >= k, limit=120 + 5 * k)
                tg.cancel_scope.cancel()
            total = sum(rss_mb(p.pid) for p in procs)
            return {"processes": k, "sessions": k, "rss_total_mb": round(total, 1),
                    "rss_per_session_mb": round(total / k, 1)}
        finally:
            for p in procs:
                await stop(p)


async def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--baseline-processes", type=int, default=10,
                    help="0: skip the process-per-session baseline")
    ap.add_argument("--lease-ttl", type=float, default=5.0)
    ap.add_argument("--hog-s", type=float, default=8.0)
    ap.add_argument("--stall-s", type=float, default=60.0,
                    help="fail when no count moves for this long")
    args = ap.parse_args()
    out: dict[str, Any] = {"benchmark": "density"}
    stalled: list[Stalled] = []
    with RedisServer(appendonly=False) as server:
        try:
            ours = out["eventcore"] = await eventcore_density(
                server.url, args.sessions, args.lease_ttl, args.hog_s, args.stall_s)
            if args.baseline_processes > 0:
                base = out["process_per_session"] = await process_per_session(
                    server.url, args.baseline_processes, args.stall_s)
                per_session_mb = ours["per_session_kb"] / 1024
                out["ratio_memory_per_session_process_vs_coroutine"] = round(
                    base["rss_per_session_mb"] / per_session_mb, 1) if per_session_mb > 0 else None
                out["process_per_session_rss_for_n_sessions_gb_estimate"] = round(
                    base["rss_per_session_mb"] * args.sessions / 1024, 1)
        except* Stalled as group:  # (from inside a task group: wrapped)
            stalled += [e for e in group.exceptions if isinstance(e, Stalled)]
    if stalled:
        out.update(error=str(stalled[0]), counts=stalled[0].counts)
        print(json.dumps(out, indent=2))
        return 2
    print(json.dumps(out, indent=2))
    return 0 if ours["meets_target"] and ours["all_answered"] else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
