"""Dispatch throughput of one worker process, against taskiq and arq, plus recovery time.

Run: ``.venv/bin/python benchmarks/dispatch.py [--jobs 16000] [--runs 3] [--rounds 4]
[--warmup 200] [--concurrency 1000] [--recovery-runs 5]``. Spawns its own redis-server (no
AOF) and, in one run, side by side on it:

``eventcore``  sessions started -> first event recorded: N sessions of an agent that emits one
               event and ends. Each session is a ``session.created`` append that writes the
               dispatch entry atomically; one ``eventcore worker`` process claims it (lease and
               epoch in Lua), reads its history, records ``session.started``, runs the handler,
               which appends a ``message``, then records ``session.ended`` and acknowledges.
``taskiq``     no-op jobs on taskiq-redis's stream broker (``RedisStreamBroker``), one
               ``taskiq worker --workers 1`` process; a job records its completion with one XADD.
``arq``        no-op jobs, one ``arq`` worker process; a job records its completion with one XADD.

Each system runs in two modes, all with the same concurrency (in-flight limit):

``backlog``    N jobs are queued first, then the worker process starts: completions per second
               between the first and the last completion (the worker's own throughput)
``live``       the worker runs while N jobs are submitted as fast as one client can: completions
               per second from the first submission, and latency submit -> completion (p50/p99)

Completion is observed the same way for all (XREAD of a stream in this process). The
submitting client is the same for all: ``limited(n, 256, ...)``, 256 submitters each making
one awaited call of the system's own client API per job (``create_session``, ``kiq``,
``enqueue_job``), unpaced.

How a run measures, the same for every system: its ``--jobs`` are split over ``--rounds``
measurements, taken in counterbalanced order (ABC, then CBA, ...: on a shared machine a load
change in the middle of a run then weighs on every system, not on whichever ran at that
moment), each with a fresh worker process; a run's rate is over the rounds' total time (the
harmonic mean of theirs). In live mode each measurement starts after ``--warmup`` jobs have
completed (the worker's connections open, its code paths run). This process (the clients and
the watchers of all three) runs with the cyclic GC thresholds an ``eventcore worker`` uses
while it serves (``GC_THRESHOLD``).

Then the recovery time: a worker hosting sessions in the middle of a run is stopped, and a
second worker takes them over. Reported: the time from the stop until every session has
recorded an event from the new worker (median of several runs), for

``sigkill_lease``     SIGKILL with the presence check off (``--presence-interval 0``): the new
                      worker waits for the leases (``--lease-ttl``, 2 s) to lapse: the baseline
``sigkill_takeover``  SIGKILL with the presence check on and long leases (``--takeover-lease-ttl``,
                      30 s): the killed process's connections close, and the new worker takes
                      its sessions over at once (connection-closed takeover); target <= 0.5 s
``sigterm``           drain hands the sessions back at once (no lease wait)

Prints JSON: medians of ``--runs`` runs and the ratios eventcore / baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psutil
import redis.asyncio as aioredis
from _workers_common import (
    BIN,
    FeedCounter,
    eventcore_worker,
    median,
    raw_reader,
    ready,
    spawn,
    stop,
)

from eventcore import EventLog, load_settings
from eventcore.testing._server import RedisServer
from eventcore.workers._worker import GC_THRESHOLD

Result = dict[str, float]


def summarize(submit: dict[Any, float], done: dict[Any, float], n: int, t_start: float
              ) -> Result:
    ends = sorted(done.values())
    lat = sorted(done[k] - submit[k] for k in done if k in submit)
    sent = sorted(t for t in submit.values() if t >= t_start)
    return {
        "jobs_per_s": round((n - 1) / (ends[-1] - ends[0]), 1) if len(ends) > 1 else 0.0,
        # how fast the one client submitted (the live rate cannot exceed it)
        "submits_per_s": round((len(sent) - 1) / (sent[-1] - sent[0]), 1)
        if len(sent) > 1 and sent[-1] > sent[0] else 0.0,
        "jobs_per_s_from_first_submit": round(n / (ends[-1] - t_start), 1),
        "latency_p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else 0.0,
        "latency_p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)
        if lat else 0.0,
    }


RATES = ("jobs_per_s", "submits_per_s", "jobs_per_s_from_first_submit")


def combine(rounds: list[Result]) -> Result:
    """One run's result from its rounds (the same number of jobs each): a rate as over their
    total time (the harmonic mean), everything else (per-job costs, latencies) the mean."""
    out: Result = {}
    for k in rounds[0]:
        vals = [r.get(k, 0.0) for r in rounds]
        if k in RATES:
            out[k] = round(len(vals) / sum(1 / v for v in vals), 1) if all(vals) else 0.0
        else:
            out[k] = round(statistics.fmean(vals), 3)
    return out


async def watch_done(url: str, n: int, done: dict[Any, float]) -> None:
    """Completions of the baselines: entries ``{i, sent, at}`` on ``bench:done`` (read as
    eventcore's feeds are, unparsed: the watcher costs each system's client the same)."""
    r = raw_reader(url)
    last = "0-0"
    try:
        while len(done) < n:
            got = await r.execute_command("XREAD", "COUNT", 5000, "BLOCK", 200, "STREAMS",
                                          "bench:done", last)
            now = time.time()
            for _, entries in got or ():
                for eid, fields in entries:
                    for i in range(0, len(fields), 2):
                        if fields[i] == b"i":
                            done[int(fields[i + 1])] = now
                            break
                    last = eid
    finally:
        await r.aclose()


async def limited(n: int, parallel: int, fn: Callable[[int], Awaitable[None]]) -> None:
    """``fn(0) .. fn(n - 1)``, ``parallel`` at a time: ``parallel`` submitters, each taking the
    next job as soon as its last one is done (not a task and a semaphore per job: their ~60 µs
    per job were the larger part of the cheapest client's CPU, the same for every system)."""
    jobs = iter(range(n))

    async def submitter() -> None:
        for i in jobs:
            await fn(i)

    async with anyio.create_task_group() as tg:
        for _ in range(min(parallel, n)):
            tg.start_soon(submitter)


class System:
    """One contender: how to submit job ``i``, start a worker process, and see completions."""

    name = ""

    async def setup(self, url: str, run: int, mode: str) -> None: ...
    async def submit(self, i: int) -> None: ...
    def start_worker(self, conc: int) -> Any: ...
    async def watch(self, want: int, done: dict[Any, float]) -> None: ...
    async def teardown(self, proc: Any) -> None: ...

    def key(self, i: int) -> Any:
        return i


class Eventcore(System):
    name = "eventcore"

    async def setup(self, url: str, run: int, mode: str) -> None:
        self.log = EventLog(load_settings(redis_url=url, namespace=f"d{mode}{run}", shards=16))
        await self.log.start()

    def key(self, i: int) -> Any:
        return f"b{i}"

    async def submit(self, i: int) -> None:
        await self.log.create_session("first", session_id=self.key(i))

    def start_worker(self, conc: int) -> Any:
        return eventcore_worker(self.log, "-c", str(conc), "--lease-ttl", "15")

    async def watch(self, want: int, done: dict[Any, float]) -> None:
        def on(sid: str, typ: str, now: float) -> None:
            if typ == "message":
                done.setdefault(sid, now)

        await FeedCounter(self.log, on, raw=True).run(lambda: len(done) >= want)

    async def teardown(self, proc: Any) -> None:
        if proc is not None:
            await stop(proc)
        await self.log.aclose()


class Taskiq(System):
    name = "taskiq"

    async def setup(self, url: str, run: int, mode: str) -> None:
        os.environ["BENCH_REDIS_URL"] = self.url = url
        import _taskiq_app

        self.broker, self.task = _taskiq_app.broker, _taskiq_app.noop
        await self.broker.startup()

    async def submit(self, i: int) -> None:
        await self.task.kiq(i, time.time())

    def start_worker(self, conc: int) -> Any:
        return spawn([str(BIN / "taskiq"), "worker", "_taskiq_app:broker", "--workers", "1",
                      "--max-async-tasks", str(conc), "--log-level", "WARNING"],
                     {"BENCH_REDIS_URL": self.url})

    async def watch(self, want: int, done: dict[Any, float]) -> None:
        await watch_done(self.url, want, done)

    async def teardown(self, proc: Any) -> None:
        if proc is not None:
            # SIGINT is taskiq's graceful stop; a SIGTERM on top of it can wedge its shutdown
            proc.send_signal(signal.SIGINT)
            try:
                await anyio.to_thread.run_sync(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await anyio.to_thread.run_sync(proc.wait)
        await self.broker.shutdown()


class Arq(System):
    name = "arq"

    async def setup(self, url: str, run: int, mode: str) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self.url, self.tag = url, f"{run}{mode}"
        self.pool = await create_pool(RedisSettings.from_dsn(url))

    async def submit(self, i: int) -> None:
        await self.pool.enqueue_job("noop", i, time.time(), _job_id=f"{self.tag}-{i}")

    def start_worker(self, conc: int) -> Any:
        return spawn([str(BIN / "arq"), "_arq_app.WorkerSettings"],
                     {"BENCH_REDIS_URL": self.url, "BENCH_CONCURRENCY": str(conc)})

    async def watch(self, want: int, done: dict[Any, float]) -> None:
        await watch_done(self.url, want, done)

    async def teardown(self, proc: Any) -> None:
        await self.pool.aclose()
        if proc is not None:
            await stop(proc)


REDIS_PID = [0]


async def commandstats(url: str) -> dict[str, int]:
    """Calls per command so far (INFO commandstats; commands run inside scripts count too)."""
    r = aioredis.Redis.from_url(url)
    try:
        info = await r.info("commandstats")
    finally:
        await r.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def per_job_commands(before: dict[str, int], after: dict[str, int], n: int) -> Result:
    """Redis commands and script calls per job (per session lifecycle for eventcore: create,
    claim, started, handler event, ended + ack), between two commandstats snapshots; the
    benchmark's own INFO calls are left out."""
    delta = {k: v - before.get(k, 0) for k, v in after.items() if k != "info"}
    delta = {k: v for k, v in delta.items() if v > 0}
    scripts = sum(v for k, v in delta.items() if k in ("evalsha", "eval", "fcall"))
    res: Result = {"redis_commands_per_job": round(sum(delta.values()) / n, 2),
                   "script_calls_per_job": round(scripts / n, 2)}
    for k, v in sorted(delta.items(), key=lambda kv: -kv[1])[:8]:
        res[f"cmd_{k.replace('|', '_')}_per_job"] = round(v / n, 2)
    return res


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


STALL_S = 60.0  # no job completed for this long: the run fails instead of waiting for ever


async def watched(system: System, proc: Any, want: int, done: dict[Any, float]) -> None:
    """``system.watch(want, done)``, failing loudly when the worker process exits or no job
    completes for ``STALL_S`` (a dead worker, or a worker's child dead under a live parent)."""
    async def watchdog() -> None:
        seen, since = len(done), time.monotonic()
        while True:
            await anyio.sleep(0.5)  # polling a process and a counter: nothing to await
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"{system.name} worker exited with code {code} "
                                   f"({len(done)} of {want} jobs done)")
            if len(done) != seen:
                seen, since = len(done), time.monotonic()
            elif time.monotonic() - since > STALL_S:
                raise TimeoutError(f"{system.name}: no job completed for {STALL_S:.0f} s "
                                   f"({len(done)} of {want} done)")

    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog)
        await system.watch(want, done)
        tg.cancel_scope.cancel()


async def run_one(system: System, url: str, n: int, conc: int, mode: str, run: int,
                  warmup: int = 1) -> Result:
    await system.setup(url, run, mode)
    submit: dict[Any, float] = {}
    done: dict[Any, float] = {}

    async def submit_one(i: int) -> None:
        submit[system.key(i)] = time.time()
        await system.submit(i)

    proc = None
    try:
        if mode == "backlog":
            await limited(n, 256, submit_one)
            proc = system.start_worker(conc)
            t_start = time.time()
            await watched(system, proc, n, done)
        else:
            proc = system.start_worker(conc)
            # warm up: the worker process is up and consuming, its connections open and its
            # code paths run, before the clock starts (jobs n .. n + warmup - 1, submitted the
            # same way; the watchers read from the start, so they count them again below)
            warm = max(1, warmup)
            await limited(warm, 256, lambda i: submit_one(n + i))
            await watched(system, proc, warm, done)
            done.clear()
            submit.clear()
            t_start = time.time()
            cmd0 = await commandstats(url)
            cpu0 = (tree_cpu_s(proc.pid), tree_cpu_s(REDIS_PID[0]), time.process_time())
            async with anyio.create_task_group() as tg:
                tg.start_soon(watched, system, proc, n + warm, done)
                await limited(n, 256, submit_one)
            cpu1 = (tree_cpu_s(proc.pid), tree_cpu_s(REDIS_PID[0]), time.process_time())
            cmd1 = await commandstats(url)
            for i in range(warm):
                done.pop(system.key(n + i), None)
            res = summarize(submit, done, n, t_start)
            # CPU per job: what the throughput would be on a machine of its own
            for name, a, b in zip(("worker", "redis", "client"), cpu0, cpu1, strict=True):
                res[f"{name}_cpu_ms_per_job"] = round(1000 * (b - a) / n, 3)
            # what bounds the live rate when all three share a small machine's cores
            res["total_cpu_ms_per_job"] = round(
                sum(1000 * (b - a) / n for a, b in zip(cpu0, cpu1, strict=True)), 3)
            res.update(per_job_commands(cmd0, cmd1, n))
            return res
        return summarize(submit, done, n, t_start)
    finally:
        await system.teardown(proc)


# -- recovery ----------------------------------------------------------------------------------
async def recovery_run(url: str, m: int, ttl: float, run: int, how: str) -> float:
    settings = load_settings(redis_url=url, namespace=f"rec{how.replace('_', '')}{run}",
                             shards=16)
    # the baseline waits for the lease: no presence check on either worker
    presence = ["--presence-interval", "0"] if how == "sigkill_lease" else []
    async with EventLog(settings) as log:
        a = eventcore_worker(log, "--lease-ttl", str(ttl), "--drain-timeout", "0", *presence,
                             BENCH_HOLD_S="600")
        b = None
        try:
            await ready(a)
            replied: set[str] = set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(FeedCounter(log, lambda s, t, _: replied.add(s)
                                          if t == "message" else None).run,
                              lambda: len(replied) >= m)
                for i in range(m):
                    await log.create_session("hold", session_id=f"h{i}", input="x")
            b = eventcore_worker(log, "--lease-ttl", str(ttl), *presence)
            await ready(b)
            recovered: dict[str, float] = {}

            def on(sid: str, typ: str, now: float) -> None:
                if typ == "progress":
                    recovered.setdefault(sid, now)

            t0 = time.time()
            if how.startswith("sigkill"):
                a.kill()
            else:
                a.terminate()
            async with anyio.create_task_group() as tg:
                tg.start_soon(FeedCounter(log, on).run, lambda: len(recovered) >= m)
            return max(recovered.values()) - t0
        finally:
            a.kill()
            await stop(a)
            if b is not None:
                await stop(b)


TARGETS = {"taskiq": 2.0, "arq": 4.0}
"""Issue 11: eventcore's live rate at least this many times each baseline's, in every run."""


def targets(raw: dict[str, dict[str, list[Result]]], systems: Any, modes: list[str]
            ) -> dict[str, Any]:
    """The ratio lines: eventcore / baseline per run (measured side by side, one after the
    other on the same Redis), their median, and whether the live target is met in every run;
    and what one session lifecycle costs Redis."""
    out: dict[str, Any] = {}
    if "eventcore" not in systems:
        return out
    lines: list[str] = []
    checks: dict[str, Any] = {}
    for base, want in TARGETS.items():
        if base not in systems:
            continue
        for mode in modes:
            ours, theirs = raw["eventcore"][mode], raw[base][mode]
            runs = [round(e["jobs_per_s"] / b["jobs_per_s"], 2) if b["jobs_per_s"] else 0.0
                    for e, b in zip(ours, theirs, strict=True)]
            if not runs:
                continue
            entry: dict[str, Any] = {"ratio_median": median(runs), "ratio_runs": runs}
            line = (f"dispatch {mode}: eventcore {median(e['jobs_per_s'] for e in ours):.0f} "
                    f"jobs/s = {median(runs):.2f}x {base} "
                    f"({median(b['jobs_per_s'] for b in theirs):.0f} jobs/s); runs {runs}")
            if mode == "live":
                met = min(runs) >= want
                entry.update(target=want, met_every_run=met, met_median=median(runs) >= want)
                line += f"; target >= {want:g}x in every run: {'met' if met else 'NOT met'}"
            checks[f"eventcore_vs_{base}_{mode}"] = entry
            lines.append(line)
    out["targets"] = checks
    live = raw["eventcore"].get("live") or []
    if live:
        life = {k: median(r[k] for r in live) for k in
                ("redis_commands_per_job", "script_calls_per_job", "redis_cpu_ms_per_job",
                 "worker_cpu_ms_per_job", "client_cpu_ms_per_job", "total_cpu_ms_per_job")}
        out["eventcore_per_session_lifecycle"] = {
            k.removesuffix("_per_job"): v for k, v in life.items()}
        lines.append("eventcore per session lifecycle (create, claim + session.started, "
                     f"message, session.ended + ack): {life['redis_commands_per_job']} Redis "
                     f"commands, {life['script_calls_per_job']} script calls, "
                     f"{life['total_cpu_ms_per_job']} ms CPU (worker "
                     f"{life['worker_cpu_ms_per_job']}, Redis {life['redis_cpu_ms_per_job']}, "
                     f"client {life['client_cpu_ms_per_job']})")
    out["ratio_lines"] = lines
    return out


async def flush(url: str) -> None:
    r = aioredis.Redis.from_url(url)
    await r.flushall()
    await r.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=16000,
                    help="jobs per system and run (split over --rounds)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4,
                    help="measurements per system and run, in counterbalanced order")
    ap.add_argument("--warmup", type=int, default=200,
                    help="live mode: jobs completed before each measurement's clock starts")
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--recovery-runs", type=int, default=5)
    ap.add_argument("--recovery-sessions", type=int, default=50)
    ap.add_argument("--lease-ttl", type=float, default=2.0)
    ap.add_argument("--takeover-lease-ttl", type=float, default=30.0)
    ap.add_argument("--modes", default="backlog,live", help="comma-separated: backlog,live")
    ap.add_argument("--systems", default="eventcore,taskiq,arq",
                    help="comma-separated: eventcore,taskiq,arq")
    args = ap.parse_args()
    if args.rounds < 1 or args.jobs // args.rounds < 2:
        ap.error("--rounds must be >= 1 and leave >= 2 jobs per round")
    # every client (and watcher) in this process collects garbage as an eventcore worker does
    # while it serves (the same for all three systems)
    gc.set_threshold(*GC_THRESHOLD)
    modes = args.modes.split(",")
    every: dict[str, System] = {"eventcore": Eventcore(), "taskiq": Taskiq(), "arq": Arq()}
    systems = {name: every[name] for name in args.systems.split(",")}
    raw: dict[str, dict[str, list[Result]]] = {s: {m: [] for m in modes} for s in systems}
    recovery: dict[str, list[float]] = {"sigkill_lease": [], "sigkill_takeover": [],
                                        "sigterm": []}
    with RedisServer(appendonly=False) as server:
        assert server.proc is not None
        REDIS_PID[0] = server.proc.pid
        for run in range(args.runs):
            for mode in modes:
                rounds: dict[str, list[Result]] = {name: [] for name in systems}
                for r in range(args.rounds):
                    # counterbalanced (ABC CBA ...): each system measured early and late in
                    # the run, so a load change on a shared machine mid-run weighs on all
                    order = list(systems.items())
                    for name, system in order if r % 2 == 0 else order[::-1]:
                        await flush(server.url)
                        res = await run_one(system, server.url, args.jobs // args.rounds,
                                            args.concurrency, mode, run * args.rounds + r,
                                            args.warmup)
                        rounds[name].append(res)
                        print(json.dumps({"run": run, "round": r, "system": name,
                                          "mode": mode, **res}), file=sys.stderr)
                for name in systems:
                    res = combine(rounds[name])
                    raw[name][mode].append(res)
                    print(json.dumps({"run": run, "system": name, "mode": mode, **res}),
                          file=sys.stderr)
        for run in range(args.recovery_runs):
            for how in recovery:
                await flush(server.url)
                ttl = args.takeover_lease_ttl if how == "sigkill_takeover" else args.lease_ttl
                took = await recovery_run(server.url, args.recovery_sessions, ttl, run, how)
                recovery[how].append(round(took, 3))
                print(json.dumps({"recovery": how, "run": run, "s": took}), file=sys.stderr)
    out: dict[str, Any] = {"benchmark": "dispatch", "jobs": args.jobs, "runs": args.runs,
                           "rounds": args.rounds, "warmup": args.warmup,
                           "concurrency": args.concurrency, "cpus": os.cpu_count()}
    for name in systems:
        out[name] = {mode: {k: median(r.get(k, 0.0) for r in results) for k in results[0]}
                     for mode, results in raw[name].items() if results}
    for base in ("taskiq", "arq"):
        if "eventcore" in systems and base in systems:
            out[f"ratio_eventcore_vs_{base}"] = {
                mode: round(out["eventcore"][mode]["jobs_per_s"]
                            / out[base][mode]["jobs_per_s"], 2)
                for mode in modes if mode in out["eventcore"]}
    out.update(targets(raw, systems, modes))
    if args.recovery_runs:
        lease = statistics.median(recovery["sigkill_lease"])
        takeover = statistics.median(recovery["sigkill_takeover"])
        out["recovery"] = {
            "sessions": args.recovery_sessions, "lease_ttl_s": args.lease_ttl,
            "after_sigkill_lease_s_median": lease,
            "after_sigkill_lease_s_runs": recovery["sigkill_lease"],
            "takeover_lease_ttl_s": args.takeover_lease_ttl,
            "after_sigkill_takeover_s_median": takeover,
            "after_sigkill_takeover_s_runs": recovery["sigkill_takeover"],
            "ratio_takeover_vs_lease": round(takeover / lease, 3),
            "takeover_target_s": 0.5, "takeover_within_target": takeover <= 0.5,
            "after_sigterm_handback_s_median": statistics.median(recovery["sigterm"]),
            "after_sigterm_handback_s_runs": recovery["sigterm"],
        }
    for line in out.get("ratio_lines", []):
        print(line, file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    anyio.run(main)
