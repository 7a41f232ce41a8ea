"""One node vs a 3-master Redis Cluster, and what replicated acknowledgement costs.

Run: ``.venv/bin/python benchmarks/cluster.py [--events N] [--producers P] [--sessions S]
[--followers F] [--groups G] [--idle-s T] [--samples K] [--runs R] [--idle-only]``. Spawns, in
one run, side by side:

- ``single``:  one redis-server (AOF, ``appendfsync everysec``) with one replica,
- ``cluster``: a LocalCluster of 3 masters, one replica each (same settings per node),

and on each measures:

``append_r0``   ``EventLog.append`` from P producers over S sessions (group commit), default
                ``EVENTCORE_APPEND_REPLICAS=0`` (acknowledged once the master has it)
``append_r1``   the same with ``EVENTCORE_APPEND_REPLICAS=1`` (``WAIT 1`` after each batch on
                its connection: acknowledged once a replica has it)
``lifecycle_r0`` / ``lifecycle_r1``  S/4 sessions end to end through one Worker (create with
                an input, claim + session.started, one message, end) with APPEND_REPLICAS 0 / 1:
                Redis commands and WAITs per session (the claim's WAIT is one per claim batch)
``delivery``    F followers (``LogFollowers``: ``EventLog.tail``'s live path, one blocking XREAD
                each) on F sessions while the sessions are appended to: events delivered/s and
                append -> delivery latency

and on the cluster only, both ways in the same run (``EVENTCORE_CLUSTER_DOORBELL`` 0 and 1):

``idle_nothing`` the cluster alone for T seconds: Redis CPU without any client (the baseline)
``idle_poll`` / ``idle_doorbell``   G subscriber runners (a group each) and one worker, idle:
                Redis CPU (ms per s, masters) and XREADGROUP calls per second while nothing
                is appended for T seconds; then K appends, each after a random 0.2-0.6 s of
                idleness: append -> delivery latency to a subscriber (p50/p99 ms). The fast
                poll (5 ms doubling to 100 ms) against the doorbell (the shards' notify /
                dispatch channels, safety poll 1 s).

Per mode: events/s, p50/p99 append latency (ms), Redis CPU per event (``INFO cpu`` deltas summed
over the masters, and over the replicas apart), Redis commands per event (``INFO
commandstats`` deltas over the masters: the script's inner commands included) and client round
trips per event (the appender's batches). Plus memory per session and per event (``INFO
memory`` ``used_memory`` delta over the masters after S sessions of 20 events), and the ratios:
cluster vs single (the scaling ratio) and r1 vs r0 (the price of replicated acknowledgement).

On a 2-core machine (shared with others) the cluster cannot be faster: its masters, replicas
and this process share the cores. The scaling claim rests on the cost per event (CPU, commands,
round trips), which is what adding masters divides. With ``--runs`` > 1 each run goes to stderr
and the medians to stdout. Any failure or timeout exits non-zero with the error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import median_of_runs, pct_ms, timed_producers  # noqa: E402

from eventcore import Envelope, EventLog, load_settings  # noqa: E402
from eventcore._follow import LogFollowers  # noqa: E402
from eventcore.subscribers import Delivery, SubscriberRunner  # noqa: E402
from eventcore.testing._server import LocalCluster, RedisServer  # noqa: E402
from eventcore.workers import App, Worker  # noqa: E402

PAYLOAD = {"text": "hello from the benchmark", "n": 0}
MODE_TIMEOUT_S = 600


class Target:
    """The nodes of one deployment: ``url`` to point EventLog at, ``masters`` and ``replicas``
    to read INFO from."""

    def __init__(self, name: str, url: str, masters: Sequence[str], replicas: Sequence[str]
                 ) -> None:
        self.name = name
        self.url = url
        self.masters = list(masters)
        self.replicas = list(replicas)

    async def _info(self, urls: Sequence[str], section: str) -> list[dict[str, Any]]:
        out = []
        for url in urls:
            r = aioredis.Redis.from_url(url)
            try:
                out.append(await r.info(section))
            finally:
                await r.aclose()
        return out

    async def snapshot(self) -> dict[str, float]:
        cpu_m = await self._info(self.masters, "cpu")
        cpu_r = await self._info(self.replicas, "cpu")
        stats = await self._info(self.masters, "commandstats")
        mem = await self._info(self.masters, "memory")
        return {
            "cpu_masters": sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"])
                               for i in cpu_m),
            "cpu_replicas": sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"])
                                for i in cpu_r),
            "calls": sum(int(v["calls"]) for s in stats for k, v in s.items()
                         if k.startswith("cmdstat_") and k != "cmdstat_info"),
            "xreadgroup": sum(int(s.get("cmdstat_xreadgroup", {}).get("calls", 0))
                              for s in stats),
            "memory": sum(int(i["used_memory"]) for i in mem),
            "waits": sum(int(s.get("cmdstat_wait", {}).get("calls", 0)) for s in stats),
        }


def _per_event(before: dict[str, float], after: dict[str, float], events: int
               ) -> dict[str, float]:
    return {
        "redis_cpu_us_per_event_masters": round(
            (after["cpu_masters"] - before["cpu_masters"]) / events * 1e6, 2),
        "redis_cpu_us_per_event_replicas": round(
            (after["cpu_replicas"] - before["cpu_replicas"]) / events * 1e6, 2),
        "redis_commands_per_event": round((after["calls"] - before["calls"]) / events, 3),
    }


def _settings(target: Target, namespace: str, replicas: int) -> Any:
    return load_settings(redis_url=target.url, namespace=namespace, shards=16,
                         retry_budget_s=30, append_replicas=replicas,
                         append_replicas_timeout_ms=5000)


async def bench_append(target: Target, args: argparse.Namespace, replicas: int
                       ) -> dict[str, Any]:
    async with EventLog(_settings(target, f"a{time.monotonic_ns()}", replicas)) as log:
        sids = [f"bench-{i}" for i in range(args.sessions)]
        for sid in sids:
            await log.create_session(session_id=sid)
        per = args.events // args.producers
        async def one(p: int, i: int) -> int:
            await log.append(Envelope(type="message", session_id=sids[(p + i) % len(sids)],
                                      payload=PAYLOAD))
            return 1

        trips0 = log.appender.round_trips
        before = await target.snapshot()
        py0 = time.process_time()
        elapsed, latencies = await timed_producers(args.producers, per, one)
        py = time.process_time() - py0
        after = await target.snapshot()
        events = per * args.producers
        return {
            "events": events,
            "events_per_s": round(events / elapsed),
            "p50_ms": pct_ms(latencies, 0.5),
            "p99_ms": pct_ms(latencies, 0.99),
            "python_cpu_us_per_event": round(py / events * 1e6, 2),
            "round_trips_per_event": round((log.appender.round_trips - trips0) / events, 4),
            **_per_event(before, after, events),
        }


async def bench_delivery(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """F followers on F sessions; each session gets ``per`` events from its own producer;
    latency = delivery time - append time (the payload carries the append's clock)."""
    async with EventLog(_settings(target, f"d{time.monotonic_ns()}", 0)) as log:
        n = args.followers
        sids = [f"follow-{i}" for i in range(n)]
        for sid in sids:
            await log.create_session(session_id=sid)
        per = max(1, args.events // (4 * n))
        followers = LogFollowers(log, block_ms=1000)
        lat: list[float] = []
        got = 0
        ready = 0
        all_ready = asyncio.Event()
        clock = time.perf_counter

        async def follow(sid: str) -> None:
            nonlocal got, ready
            async with followers.subscribe(sid, 1, until_ended=False) as f:
                ready += 1
                if ready == n:
                    all_ready.set()
                async for batch in f.batches():
                    now = clock()
                    assert isinstance(batch, list), batch  # no reset in a benchmark
                    for ev in batch:
                        lat.append(now - ev.envelope().payload["t"])
                        got += 1
                    if f.cursor >= per + 1:
                        return

        async def produce(sid: str) -> None:
            for i in range(per):
                await log.emit(sid, "message", {"t": clock(), "i": i})

        before = await target.snapshot()
        start = clock()
        async with asyncio.TaskGroup() as tg:
            for sid in sids:
                tg.create_task(follow(sid))
            await all_ready.wait()
            start = clock()
            for sid in sids:
                tg.create_task(produce(sid))
        elapsed = clock() - start
        after = await target.snapshot()
        return {
            "events": got,
            "delivered_per_s": round(got / elapsed),
            "p50_ms": pct_ms(lat, 0.5),
            "p99_ms": pct_ms(lat, 0.99),
            **_per_event(before, after, got),
        }


async def bench_lifecycle(target: Target, args: argparse.Namespace, replicas: int
                          ) -> dict[str, Any]:
    """S/4 sessions hosted by one in-process Worker, end to end: created with an input,
    claimed (the claim records session.started), one message emitted by the handler, ended.
    Redis commands and WAITs per session over the masters: the claim's share of replicated
    acknowledgement next to the appends'."""
    from eventcore.workers import App, Session, Worker

    app = App()
    done = asyncio.Event()
    n = max(1, args.sessions // 4)
    ended = 0

    @app.agent("bench")
    async def bench(session: Session) -> None:
        nonlocal ended
        async for msg in session.inputs():
            await session.emit("message", {"echo": msg.payload})
            break
        ended += 1
        if ended == n:
            done.set()

    async with EventLog(_settings(target, f"l{time.monotonic_ns()}", replicas)) as log:
        before = await target.snapshot()
        start = time.perf_counter()
        async with Worker(app, log, concurrency=n, block_ms=100, poll_interval_s=1.0,
                          idle_timeout_s=60.0) as worker:
            await asyncio.gather(*(log.create_session("bench", session_id=f"life-{i}",
                                                      input=i) for i in range(n)))
            await done.wait()
            elapsed = time.perf_counter() - start
        after = await target.snapshot()
    return {
        "sessions": n,
        "sessions_per_s": round(n / elapsed),
        "redis_commands_per_session": round((after["calls"] - before["calls"]) / n, 3),
        "waits_per_session": round((after["waits"] - before["waits"]) / n, 3),
        "claim_batches_not_replicated": worker.metrics.claims_not_replicated,
    }


async def bench_memory(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """used_memory over the masters grown by S sessions of 20 events (created, 19 messages)."""
    async with EventLog(_settings(target, f"m{time.monotonic_ns()}", 0)) as log:
        before = await target.snapshot()
        for start in range(0, args.sessions, 100):
            batch = [f"mem-{i}" for i in range(start, min(args.sessions, start + 100))]
            await asyncio.gather(*(log.create_session(session_id=s) for s in batch))
            await log.append_many([Envelope(type="message", session_id=s, payload=PAYLOAD)
                                   for s in batch for _ in range(19)])
        after = await target.snapshot()
    grown = after["memory"] - before["memory"]
    return {"sessions": args.sessions, "events_per_session": 20,
            "bytes_per_session": round(grown / args.sessions),
            "bytes_per_event": round(grown / (args.sessions * 20))}


class _Latency:
    """A subscriber recording append -> delivery (the payload carries the append's clock)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lat: list[float] = []
        self.got = asyncio.Event()

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        now = time.perf_counter()
        for d in deliveries:
            payload = d.envelope.payload
            if isinstance(payload, dict) and "t" in payload:
                self.lat.append(now - payload["t"])
                self.got.set()


async def bench_idle_groups(target: Target, args: argparse.Namespace, doorbell: bool
                            ) -> dict[str, Any]:
    """G idle subscriber runners and one idle worker: what idling costs Redis, and how late
    an append after idleness is delivered."""
    settings = load_settings(redis_url=target.url, namespace=f"i{time.monotonic_ns()}",
                             shards=16, retry_budget_s=30, cluster_doorbell=doorbell,
                             cluster_safety_poll_s=1.0)
    async with EventLog(settings) as log:
        s = await log.create_session()
        subs = [_Latency(f"idle{i}") for i in range(args.groups)]
        async with contextlib.AsyncExitStack() as stack:
            for sub in subs:
                await stack.enter_async_context(SubscriberRunner(log, sub, block_ms=2000))
            await stack.enter_async_context(Worker(App(), log, block_ms=1000))
            await asyncio.sleep(1.0)  # settled: the creation read, the reads parked
            before = await target.snapshot()
            start = time.perf_counter()
            await asyncio.sleep(args.idle_s)
            after = await target.snapshot()
            idle = time.perf_counter() - start
            rng = random.Random(7)
            for i in range(args.samples):
                await asyncio.sleep(rng.uniform(0.2, 0.6))
                for sub in subs:
                    sub.got.clear()
                await log.emit(s.session_id, "message", {"t": time.perf_counter(), "i": i})
                async with asyncio.timeout(30):
                    for sub in subs:
                        await sub.got.wait()
        lat = [x for sub in subs for x in sub.lat]
    return {
        "doorbell": doorbell,
        "groups": args.groups,
        "idle_s": round(idle, 2),
        "idle_xreadgroup_per_s": round((after["xreadgroup"] - before["xreadgroup"]) / idle, 1),
        "idle_commands_per_s": round((after["calls"] - before["calls"]) / idle, 1),
        "idle_redis_cpu_ms_per_s": round(
            (after["cpu_masters"] - before["cpu_masters"]) / idle * 1000, 3),
        "deliveries": len(lat),
        "after_idle_p50_ms": pct_ms(lat, 0.5),
        "after_idle_p99_ms": pct_ms(lat, 0.99),
    }


async def bench_idle_nothing(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """The cluster alone for T seconds (no client): what the masters cost anyway."""
    before = await target.snapshot()
    start = time.perf_counter()
    await asyncio.sleep(args.idle_s)
    after = await target.snapshot()
    idle = time.perf_counter() - start
    return {"idle_s": round(idle, 2),
            "idle_commands_per_s": round((after["calls"] - before["calls"]) / idle, 1),
            "idle_redis_cpu_ms_per_s": round(
                (after["cpu_masters"] - before["cpu_masters"]) / idle * 1000, 3)}


def _idle_ratios(poll: dict[str, Any], bell: dict[str, Any], nothing: dict[str, Any]
                 ) -> dict[str, float]:
    base = nothing["idle_redis_cpu_ms_per_s"]
    return {
        "idle_redis_cpu_above_nothing_doorbell_vs_poll": round(
            max(0.0, bell["idle_redis_cpu_ms_per_s"] - base)
            / max(1e-9, poll["idle_redis_cpu_ms_per_s"] - base), 3),
        "idle_xreadgroup_doorbell_vs_poll": round(
            bell["idle_xreadgroup_per_s"] / max(1e-9, poll["idle_xreadgroup_per_s"]), 3),
        "idle_redis_cpu_doorbell_vs_poll": round(
            bell["idle_redis_cpu_ms_per_s"] / max(1e-9, poll["idle_redis_cpu_ms_per_s"]), 3),
        "after_idle_p50_doorbell_vs_poll": round(
            bell["after_idle_p50_ms"] / max(1e-9, poll["after_idle_p50_ms"]), 3),
        "after_idle_p99_doorbell_vs_poll": round(
            bell["after_idle_p99_ms"] / max(1e-9, poll["after_idle_p99_ms"]), 3),
    }


async def idle_modes(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"idle_nothing": await bench_idle_nothing(target, args)}
    for name, doorbell in [("idle_poll", False), ("idle_doorbell", True)]:
        async with asyncio.timeout(MODE_TIMEOUT_S):
            out[name] = await bench_idle_groups(target, args, doorbell)
    out["doorbell_vs_poll"] = _idle_ratios(out["idle_poll"], out["idle_doorbell"],
                                           out["idle_nothing"])
    return out


async def one_target(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make in [("append_r0", lambda: bench_append(target, args, 0)),
                       ("append_r1", lambda: bench_append(target, args, 1)),
                       ("lifecycle_r0", lambda: bench_lifecycle(target, args, 0)),
                       ("lifecycle_r1", lambda: bench_lifecycle(target, args, 1)),
                       ("delivery", lambda: bench_delivery(target, args)),
                       ("memory", lambda: bench_memory(target, args))]:
        async with asyncio.timeout(MODE_TIMEOUT_S):
            out[name] = await make()
    r0, r1 = out["append_r0"], out["append_r1"]
    out["replicated_ack_cost"] = {
        "throughput_r1_vs_r0": round(r1["events_per_s"] / r0["events_per_s"], 3),
        "p50_ms_added": round(r1["p50_ms"] - r0["p50_ms"], 3),
        "redis_commands_per_event_added": round(
            r1["redis_commands_per_event"] - r0["redis_commands_per_event"], 3),
    }
    l0, l1 = out["lifecycle_r0"], out["lifecycle_r1"]
    out["replicated_lifecycle_cost"] = {
        "sessions_per_s_r1_vs_r0": round(l1["sessions_per_s"] / l0["sessions_per_s"], 3),
        "redis_commands_per_session_added": round(
            l1["redis_commands_per_session"] - l0["redis_commands_per_session"], 3),
        "waits_per_session": l1["waits_per_session"],
    }
    return out


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.idle_only:
        with LocalCluster(masters=3, replicas=1) as cluster:
            masters = cluster.masters()
            target = Target("cluster", cluster.url, [n.url for n in masters],
                            [n.url for n in cluster.nodes if n not in masters])
            out["redis"] = masters[0].version
            out["cluster"] = await idle_modes(target, args)
        return out
    with RedisServer(appendfsync="everysec") as master, RedisServer(
            appendfsync="everysec",
            extra=("--replicaof", "127.0.0.1", str(master.port))) as replica:
        await _wait_link(replica)
        single = Target("single", master.url, [master.url], [replica.url])
        out["redis"] = master.version
        out["single"] = await one_target(single, args)
    with LocalCluster(masters=3, replicas=1) as cluster:
        masters = cluster.masters()
        target = Target("cluster", cluster.url, [n.url for n in masters],
                        [n.url for n in cluster.nodes if n not in masters])
        out["cluster"] = await one_target(target, args)
        out["cluster"].update(await idle_modes(target, args))
    s, c = out["single"], out["cluster"]
    out["ratios"] = {
        "append_cluster_vs_single": round(
            c["append_r0"]["events_per_s"] / s["append_r0"]["events_per_s"], 3),
        "append_r1_cluster_vs_single": round(
            c["append_r1"]["events_per_s"] / s["append_r1"]["events_per_s"], 3),
        "delivery_cluster_vs_single": round(
            c["delivery"]["delivered_per_s"] / s["delivery"]["delivered_per_s"], 3),
        "redis_cpu_per_event_cluster_vs_single": round(
            c["append_r0"]["redis_cpu_us_per_event_masters"]
            / max(1e-9, s["append_r0"]["redis_cpu_us_per_event_masters"]), 3),
    }
    return out


async def _wait_link(replica: RedisServer) -> None:
    async with asyncio.timeout(30):
        while "master_link_status:up" not in replica.command("INFO", "replication"):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--producers", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--followers", type=int, default=50)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--idle-only", action="store_true",
                        help="only the idle group reads, on the cluster (poll vs doorbell)")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    runs = []
    try:
        for i in range(args.runs):
            runs.append(asyncio.run(one_run(args)))
            print(json.dumps({"run": i + 1, **runs[-1]}), file=sys.stderr)
    except BaseException as exc:  # fail loudly: no partial JSON on stdout
        print(f"benchmarks/cluster.py failed: {exc!r}", file=sys.stderr)
        raise SystemExit(1) from exc
    result = {"runs": args.runs, "cpus": len(os.sched_getaffinity(0)),
              "load_avg_1m": round(os.getloadavg()[0], 2), "median": median_of_runs(runs)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
