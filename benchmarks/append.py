"""Append throughput: eventcore's public API against a naive and a raw-pipelined baseline.

Run: ``.venv/bin/python benchmarks/append.py [--events N] [--producers P] [--runs R]
[--loop asyncio|uvloop]``. Spawns its own redis-server (AOF on, ``appendfsync everysec``, the
embedded default) and, in one run, side by side on that server:

``eventcore_append``          ``EventLog.append`` from P concurrent producer tasks over S sessions
                              (default 1000 over 100: several writers per session, as an agent's
                              token stream, tool calls and signals are), auto-batched: seq, dedupe,
                              session stream + shard feed, metadata, notification
``eventcore_append_1_per_session``  the same with one producer per session (P sessions): every
                              event in a batch belongs to a different session (the costliest case)
``eventcore_append_many``     ``EventLog.append_many`` with batches of 100 envelopes per call
``naive_xadd``                one awaited redis-py XADD per event, one producer (no seq, no dedupe)
``naive_xadd_concurrent``     the same from P concurrent producers sharing a connection pool
``raw_pipelined_xadd``        pipelines of 1000 XADDs, no seq, no dedupe
``server_limit_xadd``         ``redis-benchmark -P 64 XADD`` on the same server (when
                              redis-benchmark is on PATH): what the server alone takes;
                              ``append_fraction_of_server_limit`` is our share of it

Prints JSON: events/s, p50/p99 append latency (ms) and the CPU time per event of this process
and of redis-server (which show what the box, shared or not, can do), per mode, the ratios, and
``targets``: each of issue 11's targets for this row (>= 15x naive, >= 2x raw pipelined XADD,
<= 6 us Python and <= 8 us Redis CPU per event) with the value measured and whether it is met.
With ``--runs`` > 1 each run goes to stderr and the medians to stdout (the targets judged on
the medians). ``load_average_1m`` says how busy the machine was as the run started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from _measure import median_of_runs, pct_ms, timed_producers

from eventcore import Envelope, EventLog, load_settings
from eventcore.testing._server import RedisServer

PAYLOAD = {"text": "hello from the benchmark", "n": 0}


def _report(
    events: int, elapsed: float, latencies: list[float], cpu: tuple[float, float] | None = None
) -> dict[str, float]:
    out = {
        "events": events,
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "p50_ms": pct_ms(latencies, 0.50),
        "p99_ms": pct_ms(latencies, 0.99),
    }
    if cpu is not None:
        out["python_cpu_us_per_event"] = round(cpu[0] / events * 1e6, 2)
        out["redis_cpu_us_per_event"] = round(cpu[1] / events * 1e6, 2)
    return out


class Cpu:
    """CPU seconds spent by this process and by redis-server between start() and stop()."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def _redis_cpu(self) -> float:
        r = aioredis.Redis.from_url(self.url)
        try:
            info = await r.info("cpu")
        finally:
            await r.aclose()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def start(self) -> None:
        self.py = time.process_time()
        self.rd = await self._redis_cpu()

    async def stop(self) -> tuple[float, float]:
        return time.process_time() - self.py, await self._redis_cpu() - self.rd


async def bench_eventcore(
    url: str, events: int, producers: int, sessions: int, *, name: str, many: bool
) -> dict[str, Any]:
    settings = load_settings(redis_url=url, namespace=f"b{time.monotonic_ns()}", shards=16)
    cpu = Cpu(url)
    out: dict[str, Any] = {}
    async with EventLog(settings) as log:
        sids = [
            (await log.create_session(session_id=f"bench-{i}")).session_id
            for i in range(sessions)
        ]
        per = events // producers

        async def one(p: int, i: int) -> int:
            await log.append(Envelope(type="message", session_id=sids[p % sessions],
                                      payload=PAYLOAD))
            return 1

        rt0 = log.appender.round_trips
        await cpu.start()
        elapsed, lat = await timed_producers(producers, per, one)
        out[name] = _report(per * producers, elapsed, lat, await cpu.stop())
        out[name]["sessions"] = sessions
        out[name]["producers"] = producers
        out[name]["round_trips"] = log.appender.round_trips - rt0
        expected = sessions + out[name]["events"]

        if many:
            batch = 100
            many_producers = max(1, min(producers, 32))
            per_many = max(1, events // (batch * many_producers))

            async def append_many(p: int, i: int) -> int:
                sid = sids[(p * 31 + i) % sessions]
                await log.append_many(
                    [Envelope(type="message", session_id=sid, payload=PAYLOAD)
                     for _ in range(batch)]
                )
                return batch

            await cpu.start()
            elapsed, lat = await timed_producers(many_producers, per_many, append_many)
            out["eventcore_append_many"] = _report(
                per_many * many_producers * batch, elapsed, lat, await cpu.stop()
            )
            expected += out["eventcore_append_many"]["events"]
        # What the log holds must be what was appended (a benchmark of a broken log is worthless).
        total = sum([await log.last_seq(s) for s in sids])
        if total != expected:
            raise SystemExit(f"log holds {total} events, expected {expected}")
    return out


async def bench_naive(url: str, events: int, producers: int) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url, max_connections=64)
    fields: dict[Any, Any] = {"t": "message", "d": json.dumps(PAYLOAD)}
    try:
        n = max(1000, events // 10)  # a sequential run this long is plenty to measure

        async def seq_step(p: int, i: int) -> int:
            await r.xadd("naive:seq", fields)
            return 1

        cpu = Cpu(url)
        await cpu.start()
        elapsed, lat = await timed_producers(1, n, seq_step)
        sequential = _report(n, elapsed, lat, await cpu.stop())

        # timeout=None: producers queue for a connection as long as it takes (the default
        # 20 s wait fails the baseline outright on a slow or busy machine)
        pool = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=None))
        per = events // producers

        async def conc_step(p: int, i: int) -> int:
            await pool.xadd(f"naive:{p % 64}", fields)
            return 1

        await cpu.start()
        elapsed, lat = await timed_producers(producers, per, conc_step)
        concurrent = _report(per * producers, elapsed, lat, await cpu.stop())
        await pool.aclose()
    finally:
        await r.aclose()
    return {"naive_xadd": sequential, "naive_xadd_concurrent": concurrent}


async def bench_pipelined(url: str, events: int) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url)
    fields: dict[Any, Any] = {"t": "message", "d": json.dumps(PAYLOAD)}
    chunk = 1000
    try:
        async def step(p: int, i: int) -> int:
            async with r.pipeline(transaction=False) as pipe:
                for _ in range(chunk):
                    pipe.xadd("raw:pipe", fields)
                await pipe.execute()
            return chunk

        cpu = Cpu(url)
        await cpu.start()
        elapsed, lat = await timed_producers(1, events // chunk, step)
        used = await cpu.stop()
    finally:
        await r.aclose()
    return {"raw_pipelined_xadd": _report(events // chunk * chunk, elapsed, lat, used)}


def bench_server_limit(port: int, events: int) -> dict[str, Any]:
    """``redis-benchmark -P 64`` XADDs of the benchmark's entry: the server's own limit."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return {"server_limit_xadd": {"skipped": "redis-benchmark is not on PATH"}}
    cmd = [exe, "-h", "127.0.0.1", "-p", str(port), "-n", str(events), "-P", "64", "-c", "4",
           "--csv", "XADD", "limit:xadd", "*", "t", "message", "d", json.dumps(PAYLOAD)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    # the last line: "<test name>","rps","avg","min","p50",... (the name holds unescaped quotes
    # and commas of the payload: split from the right)
    fields = [f.strip('"') for f in done.stdout.strip().splitlines()[-1].rsplit(",", 7)]
    return {"server_limit_xadd": {"events": events, "events_per_s": round(float(fields[1])),
                                  "p50_ms": float(fields[4])}}


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    with RedisServer(appendfsync="everysec") as server:
        out: dict[str, Any] = {"redis": server.version, "loop": args.loop,
                               "load_average_1m": round(os.getloadavg()[0], 2)}
        out |= await bench_eventcore(server.url, args.events, args.producers, args.sessions,
                                     name="eventcore_append", many=True)
        out |= await bench_eventcore(server.url, args.events, args.producers, args.producers,
                                     name="eventcore_append_1_per_session", many=False)
        out |= await bench_naive(server.url, args.events, args.producers)
        out |= await bench_pipelined(server.url, args.events)
        out |= bench_server_limit(server.port, args.events)
    api = out["eventcore_append"]["events_per_s"]
    naive = out["naive_xadd"]["events_per_s"]
    out["ratios"] = {
        "append_vs_naive": round(api / naive, 2),
        "append_1_per_session_vs_naive": round(
            out["eventcore_append_1_per_session"]["events_per_s"] / naive, 2),
        "append_many_vs_naive": round(out["eventcore_append_many"]["events_per_s"] / naive, 2),
        "append_vs_naive_concurrent": round(
            api / out["naive_xadd_concurrent"]["events_per_s"], 2),
        "append_vs_raw_pipelined": round(api / out["raw_pipelined_xadd"]["events_per_s"], 3),
    }
    if "events_per_s" in out["server_limit_xadd"]:
        out["ratios"]["append_fraction_of_server_limit"] = round(
            api / out["server_limit_xadd"]["events_per_s"], 3)
    out["targets"] = targets(out)
    return out


# issue 11's targets for the append row: (report path, comparison, bound)
TARGETS: dict[str, tuple[tuple[str, str], str, float]] = {
    "append_vs_naive": (("ratios", "append_vs_naive"), ">=", 15.0),
    "append_vs_raw_pipelined": (("ratios", "append_vs_raw_pipelined"), ">=", 2.0),
    "python_cpu_us_per_event": (("eventcore_append", "python_cpu_us_per_event"), "<=", 6.0),
    "redis_cpu_us_per_event": (("eventcore_append", "redis_cpu_us_per_event"), "<=", 8.0),
}


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of issue 11 with the value measured and whether it is met (computed again
    on the medians of several runs)."""
    out: dict[str, dict[str, Any]] = {}
    for name, ((section, key), op, bound) in TARGETS.items():
        value = report[section][key]
        met = value >= bound if op == ">=" else value <= bound
        out[name] = {"value": value, "target": f"{op} {bound:g}", "met": bool(met)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--producers", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    run: Callable[[Any], Any] = asyncio.run
    if args.loop == "uvloop":
        import uvloop  # the bench extra installs it

        run = uvloop.run
    runs = []
    for i in range(args.runs):
        runs.append(run(one_run(args)))
        print(json.dumps({"run": i + 1, **runs[-1]}), file=sys.stderr)
    median = median_of_runs(runs)
    median["targets"] = targets(median)  # not the median of the runs' verdicts
    result = {"runs": args.runs, "cpus": _cpus(), "median": median}
    print(json.dumps(result, indent=2))


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
