"""The whole pipeline under sustained load, as an operator runs it (the ``slow`` CI target).

One redis-server; ``eventcore serve`` (API, SSE hub, projector, persistence into PostgreSQL,
retention with a 10 s hot window); ``eventcore worker`` processes hosting the ``soak`` agent;
a second history process into SQLite; 200 SSE clients, two per session.

1. **Capacity**: ``burst_concurrency`` clients post inputs as fast as the API takes them for
   ``burst_s``; the accepted rate is the capacity. Then everything drains, and once the
   burst is older than the hot window retention must have trimmed it out of Redis.
2. **Sustained**: inputs at ``fraction`` of that rate for ``EC_SOAK_SECONDS`` (default 300),
   spread evenly over the sessions; a session ends after ``session_life_s`` and a new one,
   with two new clients, takes its place. Sampled every few seconds: each consumer group's
   backlog must stay under ``lag_bound_s`` of appends and catch up again within every
   ``recover_s``, Redis memory must level off and the streams stay as short as retention
   promises.
3. **Exactly once**: afterwards every event of every session is in PostgreSQL and in SQLite
   exactly once (1..last seq, no gap, the same envelope the clients got), every client saw
   every event of its session in order with no gap or duplicate, and every input the API
   acknowledged was answered by the agent.

The report (sustained rate, per-stage lag maxima, CPU per process, the limiting stage) is
printed and written with every sample to ``soak.json`` in the test's tmp dir (or to
``EC_SOAK_REPORT``). Knobs: ``EC_SOAK_*`` (``soak_support.Knobs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from soak_support import (
    GROUPS,
    Cpu,
    Driver,
    Knobs,
    Sampler,
    Tracked,
    canonical,
    deployment,
)
from sqlalchemy.ext.asyncio import create_async_engine

from eventcore import EventLog, load_settings

KNOBS = Knobs()
pytestmark = [pytest.mark.slow, pytest.mark.postgres]


async def measure_capacity(driver: Driver, sessions: list[Tracked], knobs: Knobs) -> float:
    """Inputs per second the API accepts from ``burst_concurrency`` clients posting back to
    back, with everything else running."""
    acked0, t0 = driver.acked, time.monotonic()
    end = t0 + knobs.burst_s

    async def poster(k: int) -> None:
        conn, i = driver.connection(), k
        while time.monotonic() < end:
            await driver.send(conn, sessions[i % len(sessions)])
            i += knobs.burst_concurrency

    async with anyio.create_task_group() as tg:
        for k in range(knobs.burst_concurrency):
            tg.start_soon(poster, k)
    return (driver.acked - acked0) / (time.monotonic() - t0)


async def sustain(driver: Driver, first: list[Tracked], rate: float, knobs: Knobs
                  ) -> dict[str, Any]:
    """``rate`` inputs/s over the sessions for ``knobs.seconds``; each session ends after
    ``session_life_s`` (its last input ends it) and a new one takes its slot."""
    n = len(first)
    interval = n / rate  # per slot
    per_session = max(3, round(knobs.session_life_s / interval))
    acked0, t0 = driver.acked, time.monotonic()
    end = t0 + knobs.seconds
    created = 0

    async def slot(k: int, tg: Any) -> None:
        nonlocal created
        conn, s, sent = driver.connection(), first[k], 0
        next_at = t0 + k * interval / n
        while True:
            await anyio.sleep(max(0.0, next_at - time.monotonic()))  # the pace of the load
            now = time.monotonic()
            if now >= end:
                break
            if sent + 1 >= per_session:
                await driver.send(conn, s, last=True)
                tg.start_soon(driver.finish, conn, s, knobs.settle_s)
                s, sent = await driver.create(conn), 0
                created += 1
            else:
                await driver.send(conn, s)
                sent += 1
            # a slot that fell behind (a slow answer) catches up at most 1 s of its schedule
            next_at = max(next_at + interval, now - 1.0)
        await driver.finish(conn, s, knobs.settle_s)

    async with anyio.create_task_group() as tg:
        for k in range(n):
            tg.start_soon(slot, k, tg)
    elapsed = min(time.monotonic(), end) - t0
    return {"target_inputs_per_s": round(rate, 1),
            "achieved_inputs_per_s": round((driver.acked - acked0) / max(elapsed, 1e-9), 1),
            "duration_s": round(elapsed, 1), "inputs_per_session": per_session,
            "sessions_created": created}


async def stored(url: str) -> dict[str, dict[str, Any]]:
    """Per session: rows, distinct seqs, min, max, gaps and the digest of the envelopes in seq
    order, from a history database."""
    engine = create_async_engine(url)
    events = sa.table("eventcore_events", sa.column("session_id"), sa.column("seq"),
                      sa.column("envelope"))
    out: dict[str, dict[str, Any]] = {}
    try:
        async with engine.connect() as conn:
            result = await conn.stream(sa.select(events.c.session_id, events.c.seq,
                                                 events.c.envelope)
                                       .order_by(events.c.session_id, events.c.seq))
            async for sid, seq, envelope in result:
                row = out.get(sid)
                if row is None:
                    row = out[sid] = {"rows": 0, "seqs": set(), "min": seq, "max": seq,
                                      "digest": hashlib.sha256()}
                row["rows"] += 1
                row["seqs"].add(seq)
                row["max"] = max(row["max"], seq)
                row["digest"].update(canonical(envelope) + b"\n")
    finally:
        await engine.dispose()
    return out


def check_sessions(driver: Driver, dbs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Every session: its clients saw 1..last in order, the same bytes, every acknowledged
    input and its answer; every database holds 1..last exactly once with the same envelopes."""
    failures: list[str] = []
    events = 0
    for s in driver.sessions.values():
        ends = {c.ended for c in s.clients}
        if len(ends) != 1 or None in ends:
            failures.append(f"{s.sid}: clients ended at {[c.ended for c in s.clients]} "
                            f"(last seen {[c.last for c in s.clients]})")
            continue
        (last,) = ends
        assert last is not None
        events += last
        for i, c in enumerate(s.clients):
            if c.events != last:
                failures.append(f"{s.sid} client {i}: {c.events} events, last seq {last}")
        if len({c.digest.hexdigest() for c in s.clients}) != 1:
            failures.append(f"{s.sid}: the clients saw different envelopes")
        inputs = s.clients[0].inputs
        if set(s.acked) - inputs:
            failures.append(f"{s.sid}: acknowledged inputs never streamed: "
                            f"{sorted(set(s.acked) - inputs)[:10]}")
        if inputs != s.clients[0].answers:
            failures.append(f"{s.sid}: inputs not answered: "
                            f"{sorted(inputs - s.clients[0].answers)[:10]}, answers to no "
                            f"input: {sorted(s.clients[0].answers - inputs)[:10]}")
        for name, rows in dbs.items():
            row = rows.get(s.sid)
            if row is None:
                failures.append(f"{s.sid}: nothing in {name} (last seq {last})")
                continue
            if row["rows"] != last or row["seqs"] != set(range(1, last + 1)):
                missing = sorted(set(range(1, last + 1)) - row["seqs"])
                failures.append(f"{s.sid}: {name} has {row['rows']} rows, {len(row['seqs'])} "
                                f"seqs {row['min']}..{row['max']} for last seq {last}; "
                                f"missing {missing[:10]}")
            elif row["digest"].hexdigest() != s.clients[0].digest.hexdigest():
                failures.append(f"{s.sid}: {name} stored other envelopes than were streamed")
    for name, rows in dbs.items():
        extra = set(rows) - set(driver.sessions)
        if extra:
            failures.append(f"{name}: sessions nobody created: {sorted(extra)[:5]}")
    return {"sessions": len(driver.sessions), "events": events, "failures": failures}


def metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {"http_5xx": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "eventcore_http_requests_total" and s.labels["status"] >= "500":
                out["http_5xx"] += s.value
            elif s.name in ("eventcore_sse_slow_closed_total", "eventcore_hub_lagged_clients",
                            "eventcore_hub_resyncs"):
                out[s.name] = s.value
    return out


def phase_stats(samples: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    rows = [r for r in samples if r["phase"] == phase]
    if not rows:
        return {}
    rates = [r["append_rate"] for r in rows if r["append_rate"] is not None]
    events_per_s = statistics.mean(rates) if rates else 0.0
    cpu_names = rows[0]["cpu"].keys()
    cpu = {k: round(statistics.mean(r["cpu"].get(k, 0.0) for r in rows), 2) for k in cpu_names}
    wait = {k: round(statistics.mean(r["cpu_wait"].get(k, 0.0) for r in rows), 2)
            for k in rows[0]["cpu_wait"]}
    lag = {g: max(r["groups"][g]["lag"] + r["groups"][g]["pending"] for r in rows)
           for g in GROUPS}
    return {
        "samples": len(rows),
        "events_per_s": round(events_per_s),
        "cpu_cores_mean": cpu,
        # time runnable but without a CPU (the machine is shared): seconds per second
        "cpu_wait_mean": wait,
        "max_api_healthz_ms": max((r["api_healthz_ms"] or 0.0) for r in rows),
        "max_group_backlog_entries": lag,
        "max_group_backlog_s": {g: round(v / max(events_per_s, 1.0), 2) for g, v in lag.items()},
        "max_answer_latency_s": max(r["answer_s"] for r in rows),
        "max_sse_lag_s": max(r["sse_lag_s"] for r in rows),
        "max_outstanding_inputs": max(r["outstanding_inputs"] for r in rows),
        "max_used_memory_mb": max(r["used_memory_mb"] for r in rows),
        "max_feed_len": max(r["feed_len"] for r in rows),
        "max_session_stream_len": max(r["session_stream_len"] for r in rows),
    }


# where each stage runs
_HOST = {"subscriber projector": "api", "subscriber persistence": "api",
         "subscriber persistence-sqlite": "history-sqlite", "SSE delivery": "api"}


def limiting_stage(stats: dict[str, Any]) -> str:
    """The stage that fell furthest behind (seconds of backlog) and the process it runs in,
    with that process's CPU demand: cores used plus cores' worth of time it spent runnable
    but waiting for a CPU (on a shared machine a process can be saturated at a fraction of a
    core). Without a stage behind, the process with the highest demand."""
    behind = {f"subscriber {g}": s for g, s in stats["max_group_backlog_s"].items()}
    behind["worker (answering inputs)"] = stats["max_answer_latency_s"]
    behind["SSE delivery"] = stats["max_sse_lag_s"]
    used, wait = stats["cpu_cores_mean"], stats["cpu_wait_mean"]
    demand = {k: round(used[k] + wait.get(k, 0.0), 2) for k in used}

    def process(name: str) -> str:
        return (f"{name} process: {used[name]} cores used + {wait.get(name, 0.0)} waiting "
                f"for a CPU")

    stage, seconds = max(behind.items(), key=lambda kv: kv[1])
    if seconds >= 2.0:
        host = _HOST.get(stage) or max((k for k in used if k.startswith("worker")),
                                       key=lambda k: demand[k])
        return f"{stage}, {seconds} s behind ({process(host)})"
    busiest = max(demand, key=lambda k: demand[k])
    return f"no stage more than {seconds} s behind; busiest {process(busiest)}"


@pytest.mark.timeout(int(KNOBS.burst_s + KNOBS.seconds + 3 * KNOBS.settle_s + 300))
async def test_sustained_load_through_the_whole_pipeline(
    redis_server_factory: Any, tmp_path: Path
) -> None:
    knobs = KNOBS
    redis = redis_server_factory(appendfsync="everysec", extra=("--maxclients", "10000"))
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "redis": redis.version,
                              "knobs": knobs.__dict__ | {"sessions": knobs.sessions}}
    settings = load_settings(redis_url=redis.url, namespace="soak")
    async with (deployment(redis.url, redis.proc.pid, knobs, tmp_path) as dep,
                EventLog(settings) as log):
        pids = {"api": dep.api.pid, "redis": dep.redis_pid, "history-sqlite": dep.history.pid,
                "test (load + SSE clients)": os.getpid()}
        pids |= {w.name: w.pid for w in dep.workers}
        cpu = Cpu(pids, dep.pg_url.rsplit("/", 1)[1])
        async with Driver(dep.url, knobs) as driver, anyio.create_task_group() as tg:
            sampler = Sampler(log, driver, cpu, knobs)
            tg.start_soon(sampler.run)
            conn = driver.connection()
            first = [await driver.create(conn) for _ in range(knobs.sessions)]
            with anyio.fail_after(60):  # every client is streaming (session.created seen)
                while not all(c.last >= 1 for s in first for c in s.clients):  # noqa: ASYNC110
                    await anyio.sleep(0.1)

            sampler.phase = "burst"
            capacity = await measure_capacity(driver, first, knobs)
            sampler.phase = "settle"
            report["capacity"] = {"inputs_per_s": round(capacity, 1),
                                  "concurrency": knobs.burst_concurrency,
                                  "drained_in_s": round(await sampler.settle(knobs.settle_s), 1)}
            # Retention: once the burst is older than the hot window, it leaves Redis (the
            # feeds keep one acknowledged entry per shard; the streams keep nothing).
            shards = len(log.keys.all_shards())
            report["capacity"]["trimmed_in_s"] = round(await sampler.trimmed(
                shards, 0, knobs.hot_window_s + 6 * knobs.retention_interval_s), 1)
            await sampler.sample()

            sampler.phase = "steady"
            report["sustained"] = await sustain(driver, first, knobs.fraction * capacity, knobs)
            sampler.phase = "drain"
            report["sustained"]["drained_in_s"] = round(await sampler.settle(knobs.settle_s), 1)
            await sampler.sample()
            tg.cancel_scope.cancel()
        async with httpx.AsyncClient(timeout=10) as c:
            report["api_metrics"] = metrics((await c.get(dep.url + "/metrics")).text)
        async with log.redis.pipeline(transaction=False) as pipe:
            for shard in log.keys.all_shards():
                pipe.xlen(log.keys.dead(shard))
            dead = sum(await pipe.execute())
        for w in dep.workers:
            assert w.stop() == 0, w.text()[-3000:]
        assert dep.history.stop() == 0, dep.history.text()[-3000:]
        worker_counts = [w.json_lines("stopped")[-1] for w in dep.workers]
        dbs = {"postgresql": await stored(dep.pg_url), "sqlite": await stored(dep.sqlite_url)}
    checked = check_sessions(driver, dbs)
    report = finish_report(report, sampler.samples, checked, worker_counts, dead, driver)
    write_report(report, sampler.samples, tmp_path)

    failures = checked["failures"] + report["problems"] + report["bound_violations"]
    assert not failures, f"{len(failures)} failures, first 30:\n" + "\n".join(failures[:30])
    assert report["api_metrics"]["http_5xx"] == 0
    assert dead == 0, f"{dead} dead letters"
    for counts in worker_counts:
        assert counts["dead_lettered"] == counts["retries"] == counts["lost"] == 0, counts
        assert counts["fenced_writes"] == 0, counts


def write_report(report: dict[str, Any], samples: list[dict[str, Any]], tmp: Path) -> None:
    out = Path(os.environ.get("EC_SOAK_REPORT") or tmp / "soak.json")
    out.write_text(json.dumps({**report, "samples": samples}, indent=1))
    print(json.dumps(report, indent=1))
    print(f"soak report with samples: {out}")


def finish_report(report: dict[str, Any], samples: list[dict[str, Any]], checked: dict[str, Any],
                  worker_counts: list[dict[str, Any]], dead: int, driver: Driver
                  ) -> dict[str, Any]:
    burst, steady = phase_stats(samples, "burst"), phase_stats(samples, "steady")
    report["capacity"] |= {"events_per_s": burst["events_per_s"], "stages": burst,
                           "limited_by": limiting_stage(burst)}
    report["sustained"] |= {"events_per_s": steady["events_per_s"], "stages": steady,
                            "limited_by": limiting_stage(steady)}
    report["verified"] = {k: v for k, v in checked.items() if k != "failures"} | {
        "failures": len(checked["failures"]), "sse_clients_total": sum(
            len(s.clients) for s in driver.sessions.values()),
        "sse_reconnects": sum(c.reconnects for s in driver.sessions.values()
                              for c in s.clients),
        "dead_letters": dead}
    report["workers"] = [{k: c.get(k) for k in ("claims", "completed", "reclaims", "retries",
                                                "dead_lettered", "lost", "fenced_writes",
                                                "max_loop_lag_s")} for c in worker_counts]
    report["problems"] = driver.problems + [
        f"{s.sid}: {p}" for s in driver.sessions.values() for p in s.problems] + [
        f"{s.sid} client {i}: {p}" for s in driver.sessions.values()
        for i, c in enumerate(s.clients) for p in c.problems]
    report["bound_violations"] = bound_violations(samples, steady, report["knobs"])
    return report


def bound_violations(samples: list[dict[str, Any]], steady: dict[str, Any],
                     knobs: dict[str, Any]) -> list[str]:
    """While sustained: each group's backlog under ``lag_bound_s`` of appends and back under
    ``caught_up_s`` in every ``recover_s`` window (on a shared machine every process can be
    starved for a while; a stage that cannot keep up never catches up); the streams no longer
    than retention lets them grow; Redis memory levelling off (the last third of the run no
    higher than the middle third, within 10% + 4 MB)."""
    rows = [r for r in samples if r["phase"] == "steady"]
    rate = max(steady["events_per_s"], 1)
    lag_bound = max(1000, rate * knobs["lag_bound_s"])
    caught_up = max(200, rate * knobs["caught_up_s"])
    # a session stream keeps the hot window and what persistence has not stored yet, a feed
    # what some group has not acknowledged; each up to a retention interval more (and a pass
    # that itself takes up to an interval)
    stream_bound = rate * (knobs["hot_window_s"] + 3 * knobs["retention_interval_s"]
                           + knobs["lag_bound_s"]) + 1000
    feed_bound = rate * (3 * knobs["retention_interval_s"] + knobs["lag_bound_s"]) + 1000
    out = []
    for r in rows:
        for g, v in r["groups"].items():
            if v["lag"] + v["pending"] > lag_bound:
                out.append(f"t={r['t']}: {g} backlog {v['lag'] + v['pending']} > {lag_bound:.0f}")
        if r["session_stream_len"] > stream_bound:
            out.append(f"t={r['t']}: session streams hold {r['session_stream_len']} entries "
                       f"> {stream_bound:.0f}")
        if r["feed_len"] > feed_bound:
            out.append(f"t={r['t']}: feeds hold {r['feed_len']} entries > {feed_bound:.0f}")
    per_window = max(1, round(knobs["recover_s"] / knobs["sample_s"]))
    for g in GROUPS:
        backlog = [(r["t"], r["groups"][g]["lag"] + r["groups"][g]["pending"]) for r in rows]
        for i in range(len(backlog) - per_window + 1):  # every recover_s span of samples
            window = backlog[i: i + per_window]
            if min(b for _, b in window) > caught_up:
                out.append(f"t={window[0][0]}..{window[-1][0]}: {g} never caught up (backlog "
                           f"at least {min(b for _, b in window)} > {caught_up:.0f})")
                break
    third = len(rows) // 3
    if third >= 2:
        middle = max(r["used_memory_mb"] for r in rows[third: 2 * third])
        late = max(r["used_memory_mb"] for r in rows[2 * third:])
        if late > middle * 1.1 + 4:
            out.append(f"Redis used_memory still growing: {middle} MB in the middle third, "
                       f"{late} MB in the last")
    return out
