"""Subscriber throughput: the projector and persistence against a bare consumer-group loop.

Run: ``.venv/bin/python benchmarks/subscribers.py [--sessions S] [--events E] [--runs R]
[--no-postgres] [--only MODE] [--gc service|default|off]``.

Spawns its own redis-server (no AOF: this measures the consumers, not the disk), preloads S
sessions of E envelopes (messages, runs, tool calls and signals), then, in each run and in this
one process, consumes the whole feed once per mode, each mode with a fresh consumer group:

``bare_xreadgroup_xack``   XREADGROUP over every shard feed (COUNT per shard as below) and XACK
                           of what came back; no decoding, no work: the ceiling
``projector``              ``SubscriberRunner`` + ``Projector``: decode, in-order exactly-once
                           per session (positions, duplicate and gap checks), fold, CAS write
                           of each session's view, ack (views deleted before each run)
``persistence_sqlite``     ``SubscriberRunner`` + ``Persistence`` into a new SQLite file
``persistence_postgres``   the same into the local PostgreSQL (db ``test``; own tables, dropped)

Prints JSON: every run's events/s per mode, the medians, each mode's ratio to the bare loop's
median (``ratio_lines``, and ``targets``: issue 11's target per mode and whether it is met),
and CPU µs per event of this process (the driver threads included: SQLite works in one),
the redis-server and, for PostgreSQL, every postgres process on the machine (medians).

``--gc service`` (the default) runs with the cyclic collector's thresholds ``eventcore serve``
sets (``GC_THRESHOLDS``), the process the built-in subscribers run in; ``--gc default`` with
the interpreter's (a subscriber in a process of its own that leaves them alone); ``--gc off``
without the collector, to see what it costs. Each batch holds thousands of deliveries alive,
which the default thresholds rescan many times a batch.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# This file is named like the package it measures: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

from eventcore import Envelope, EventLog, load_settings  # noqa: E402
from eventcore.subscribers import Persistence, Projector, SubscriberRunner  # noqa: E402
from eventcore.testing._server import RedisServer  # noqa: E402

BATCH = 256
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _events(sid: str, n: int) -> list[Envelope]:
    out: list[Envelope] = []
    for i in range(n):
        k = i % 10
        if k == 0:
            out.append(Envelope(type="run.started", session_id=sid, run_id=f"r{i}",
                                payload={"name": "answer"}))
        elif k == 1:
            out.append(Envelope(type="tool.started", session_id=sid, run_id=f"r{i - 1}",
                                payload={"tool": "search", "call_id": f"c{i}", "args": {"q": i}}))
        elif k == 2:
            out.append(Envelope(type="tool.ended", session_id=sid, run_id=f"r{i - 2}",
                                payload={"tool": "search", "call_id": f"c{i - 1}",
                                         "result": [1, 2, 3], "duration_ms": 3.5}))
        elif k == 3:
            out.append(Envelope(type="signal", session_id=sid,
                                payload={"key": "status", "value": f"step {i}"}))
        elif k == 9:
            out.append(Envelope(type="run.completed", session_id=sid, run_id=f"r{i - 9}",
                                payload={"name": "answer"}))
        else:
            out.append(Envelope(type="message", session_id=sid, run_id=f"r{i - k}",
                                payload={"text": "hello from the benchmark", "n": i}))
    return out


async def preload(log: EventLog, sessions: int, events: int) -> tuple[list[str], int]:
    sids = []
    for _ in range(sessions):
        s = await log.create_session("bench")
        sids.append(s.session_id)
        batch = _events(s.session_id, events)
        for i in range(0, len(batch), 500):
            await log.append_many(batch[i : i + 500])
    return sids, sessions * (events + 1)


async def bare(log: EventLog, group: str) -> int:
    redis, keys = log.redis, log.keys
    feeds = [keys.feed(s) for s in keys.all_shards()]
    for feed in feeds:
        await redis.xgroup_create(feed, group, id="0", mkstream=True)  # a shard may have none
    done = 0
    while True:
        got = await redis.xreadgroup(group, "bare", dict.fromkeys(feeds, ">"), count=BATCH)
        if not got:
            return done
        async with redis.pipeline(transaction=False) as pipe:
            for stream, entries in got:
                pipe.xack(stream, group, *[eid for eid, _ in entries])
                done += len(entries)
            await pipe.execute()


async def run_subscriber(log: EventLog, sub: Any, group: str) -> int:
    runner = SubscriberRunner(log, sub, group=group, batch=BATCH, metrics_interval_s=3600)
    return await runner.drain()


def _proc_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (Linux /proc; 0 where unreadable)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _postgres_pids() -> list[int]:
    """Every postgres server process on this machine (backends come and go with pools)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "postgres":
                    out.append(int(d.name))
            except OSError:
                pass
    return out


class Cpu:
    """CPU µs per event of this process, the benchmark's redis-server and PostgreSQL."""

    def __init__(self, redis_pid: int) -> None:
        self.redis_pid = redis_pid
        self.samples: dict[str, list[dict[str, float]]] = {}

    async def timed(self, mode: str, total: int, coro: Any) -> float:
        pg = _postgres_pids() if mode == "persistence_postgres" else []
        c0, r0, p0 = time.process_time(), _proc_cpu_s([self.redis_pid]), _proc_cpu_s(pg)
        start = time.perf_counter()
        n = await coro
        elapsed = time.perf_counter() - start
        c1, r1, p1 = time.process_time(), _proc_cpu_s([self.redis_pid]), _proc_cpu_s(pg)
        if n != total:
            raise RuntimeError(f"consumed {n} of {total} entries")
        us = 1e6 / total
        sample = {"python": round((c1 - c0) * us, 2), "redis": round((r1 - r0) * us, 2)}
        if pg:
            sample["postgres"] = round((p1 - p0) * us, 2)
        self.samples.setdefault(mode, []).append(sample)
        return round(total / elapsed)

    def medians(self) -> dict[str, dict[str, float]]:
        return {m: {k: statistics.median(s[k] for s in v) for k in v[0]}
                for m, v in self.samples.items()}


async def postgres_ok() -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", 5432), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


MODES = ("bare_xreadgroup_xack", "projector", "persistence_sqlite", "persistence_postgres")
# issue 11: each mode's events/s as a fraction of the bare loop's, measured in the same run
TARGETS = {"projector": 0.6, "persistence_sqlite": 0.5, "persistence_postgres": 0.6}


async def main(sessions: int, events: int, runs: int, use_pg: bool,
               only: tuple[str, ...] = ()) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="eventcore-bench-"))
    use_pg = use_pg and await postgres_ok()
    # the bare loop always runs: every ratio is to it, in the same run
    modes = [m for m in MODES if m == MODES[0] or not only or m in only]
    if not use_pg and "persistence_postgres" in modes:
        modes.remove("persistence_postgres")
    results: dict[str, list[float]] = {m: [] for m in modes}
    try:
        with RedisServer(appendonly=False) as server:
            settings = load_settings(redis_url=server.url, namespace="bench")
            async with EventLog(settings) as log:
                sids, total = await preload(log, sessions, events)
                assert server.proc is not None
                cpu = Cpu(server.proc.pid)
                timed = cpu.timed
                for r in range(runs):
                    results["bare_xreadgroup_xack"].append(
                        await timed("bare_xreadgroup_xack", total, bare(log, f"bare{r}")))
                    if "projector" in modes:
                        await log.redis.delete(*[log.keys.view(s) for s in sids])
                        results["projector"].append(
                            await timed("projector", total,
                                        run_subscriber(log, Projector(log), f"proj{r}")))
                    if "persistence_sqlite" in modes:
                        url = f"sqlite+aiosqlite:///{tmp / f'run{r}.sqlite3'}"
                        async with Persistence(log, url) as store:
                            results["persistence_sqlite"].append(
                                await timed("persistence_sqlite", total,
                                            run_subscriber(log, store, f"sqlite{r}")))
                    if "persistence_postgres" in modes:
                        prefix = f"bench{uuid.uuid4().hex[:8]}_"
                        async with Persistence(log, PG_URL, prefix=prefix) as store:
                            try:
                                results["persistence_postgres"].append(
                                    await timed("persistence_postgres", total,
                                                run_subscriber(log, store, f"pg{r}")))
                            finally:
                                await store.drop_tables()
                version = server.version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {m: statistics.median(v) for m, v in results.items()}
    base = medians["bare_xreadgroup_xack"]
    ratios = {m: round(v / base, 3) for m, v in medians.items()}
    cpu_med = cpu.medians()
    targets = {m: {"ratio": ratios[m], "target": t, "met": ratios[m] >= t}
               for m, t in TARGETS.items() if m in ratios}
    lines = [f"{m}: {ratios[m]:.3f}x of bare XREADGROUP+XACK ({medians[m]:.0f} vs {base:.0f} "
             f"events/s, median of {runs}); target >= {t}x: "
             f"{'met' if ratios[m] >= t else 'NOT met'}"
             for m, t in TARGETS.items() if m in ratios]
    return {
        "benchmark": "subscribers",
        "redis": version,
        "shards": settings.shards,
        "batch_per_shard": BATCH,
        "sessions": sessions,
        "entries": total,
        "runs": runs,
        "gc_thresholds": gc.get_threshold(),
        "events_per_s": results,
        "median_events_per_s": medians,
        "ratio_to_bare": ratios,
        "ratio_lines": lines,
        "targets": targets,
        "cpu_us_per_event": cpu_med,
        # less swayed by other load on the machine than events/s: the bare loop's CPU per
        # event (all processes) over each mode's (what a run alone on idle cores would show
        # if nothing overlapped)
        "cpu_ratio_to_bare": {m: round(sum(cpu_med[MODES[0]].values()) / sum(c.values()), 3)
                              for m, c in cpu_med.items()},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--only", action="append", choices=MODES[1:], default=[],
                    help="run only these modes (repeatable; the bare loop always runs)")
    ap.add_argument("--gc", choices=("service", "default", "off"), default="service",
                    help="the collector's thresholds: eventcore serve's, or the interpreter's")
    a = ap.parse_args()
    if a.gc == "service":  # imported only then: the server's modules are many objects more
        from eventcore.server._http._serve import GC_THRESHOLDS

        gc.set_threshold(*GC_THRESHOLDS)
    elif a.gc == "off":  # what the collector costs: compare with the others
        gc.disable()
    out = asyncio.run(main(a.sessions, a.events, a.runs, not a.no_postgres, tuple(a.only)))
    json.dump(out, sys.stdout, indent=2)
    print()
