"""SSE fan-out: many concurrent clients on one API server process, append -> client latency and
delivered events/s, for the hub's two live paths and a baseline, side by side in one run.

    .venv/bin/python benchmarks/sse.py [--clients 100,1000,5000] [--duration 5] [--repeat 1]

Modes (each its own server process on its own port, same redis-server):

- ``pubsub``:   eventcore's app, hub live path = the append script's pub/sub notifications
- ``xread``:    eventcore's app, hub live path = one multiplexed XREAD over watched streams
- ``baseline``: a plain sse-starlette endpoint doing one blocking XREAD per client
- ``ws``:       eventcore's app (XREAD live path), clients on ``GET /v1/sessions/{id}/ws``
  instead of SSE (``websockets`` clients: the same follower, another framing)
- ``xread-queued``: ``xread`` without the direct live path (``Hub(direct=False)``): every
  event queued to each client's task, which sends it through ASGI (the path before)
- ``xread-asyncio``: ``xread`` on the stdlib event loop (uvicorn picks uvloop and httptools when
  installed; the direct live path needs httptools)
- ``xread-i<ms>``: ``xread`` with the hub's ``xread_interval_ms`` at ``<ms>``
- ``floor``:    the measured floor, not a product: a bare ASGI app under the same uvicorn, one
  multiplexed XREAD, each entry framed once and its bytes written straight to every client's
  transport (no auth, catch-up, resume, heartbeat, back-pressure or metrics). What is left per
  delivery is the socket write and the event loop.

``--high-rate R`` (default 50) adds a row at 1,000 clients with every session at ``R`` events/s
(``R`` x 1,000 deliveries/s expected) for issue 11's throughput target; each scenario is
bounded in time (it raises instead of hanging) and the JSON's ``targets`` say, per mode, each
target, the value measured and whether it is met.

Load: ``clients / per_session`` sessions, ``per_session`` clients on each, every session gets
``rate`` events/s (appended through EventLog, one ``append_many`` per 10 ms tick), so each
client should receive ``rate`` events/s (``appended_events_per_s`` says whether the load
generator kept its rate). Each event's payload carries its append wall-clock time; a client
records ``receive time - append time``. Clients are raw HTTP/1.0 sockets in this process (the
body comes chunked anyway; they look at lines only); the appender, the server and
redis-server are separate processes. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measure import percentile as pct  # noqa: E402

API_KEY = "bench-api-key-" + "k" * 24
_T = re.compile(rb'"t":([0-9.]+)')


# -- server side (runs in a subprocess) ----------------------------------------------------------
def run_server(mode: str, port: int, redis_url: str, namespace: str) -> None:
    from eventcore import load_settings
    from eventcore.server._http import serve

    hub_options = json.loads(os.environ.get("SSE_BENCH_HUB", "{}"))
    serve_options: dict[str, Any] = {}
    if mode == "xread-asyncio":  # the stdlib event loop instead of uvloop (uvicorn's "auto")
        serve_options["loop"] = "asyncio"
        mode = "xread"
    if mode == "xread-queued":  # the live path as before the direct one: every event queued
        hub_options["direct"] = False
        mode = "xread"
    if mode.startswith("xread-i"):  # xread-i<ms>: the XREAD path at most one call per <ms>
        hub_options["xread_interval_ms"] = float(mode.removeprefix("xread-i"))
        mode = "xread"
    if mode == "floor":
        app = floor_app(redis_url, namespace)
    elif mode in ("pubsub", "xread", "ws"):
        from eventcore.server._http import create_app

        settings = load_settings(redis_url=redis_url, namespace=namespace, shards=16,
                                 api_key=API_KEY, sse_live="pubsub" if mode == "pubsub"
                                 else "xread", pool_size=256)
        # SSE_BENCH_HUB: Hub options as JSON
        app = create_app(settings, hub_options=hub_options)
    else:
        app = baseline_app(redis_url, namespace)
    # every mode runs under the same serve() (uvicorn settings, GC thresholds)
    serve(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
          backlog=8192, **serve_options)


def baseline_app(redis_url: str, namespace: str) -> Any:
    """The obvious implementation: one blocking XREAD per client, formatted per client."""
    import redis.asyncio as aioredis
    from fastapi import FastAPI
    from sse_starlette import EventSourceResponse, ServerSentEvent

    from eventcore import Keys

    keys = Keys(namespace, 16)
    pool = aioredis.ConnectionPool.from_url(redis_url, max_connections=20000)
    r = aioredis.Redis(connection_pool=pool)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/sessions/{sid}/events")
    async def events(sid: str) -> EventSourceResponse:
        key = keys.session(sid).stream

        async def gen() -> Any:
            last = "0-0"
            while True:
                got = await r.xread({key: last}, count=100, block=5000)
                for _, entries in got or ():
                    for eid, f in entries:
                        last = eid.decode()
                        yield ServerSentEvent(data=f[b"d"].decode(), id=last.split("-")[1],
                                              event=f[b"t"].decode())

        return EventSourceResponse(gen(), ping=15)

    return app


def floor_app(redis_url: str, namespace: str) -> Any:
    """The floor (see the module doc): raw ASGI, one XREAD loop, pre-framed bytes written to
    each client's transport (chunked, as uvicorn frames a streaming body)."""
    import redis.asyncio as aioredis

    from eventcore import Keys

    keys = Keys(namespace, 16)
    r = aioredis.Redis.from_url(redis_url)
    clients: dict[bytes, list[Any]] = {}  # stream key -> transports
    cursors: dict[bytes, bytes] = {}
    wake = asyncio.Event()

    async def xread_loop() -> None:
        while True:
            if not cursors:
                wake.clear()
                await wake.wait()
            got = await r.xread(dict(cursors), count=500, block=100)
            for key, entries in got or ():
                cursors[key] = entries[-1][0]
                body = b"".join(b"id: %s\nevent: %s\ndata: %s\n\n"
                                % (eid.split(b"-")[1], f[b"t"], f[b"d"]) for eid, f in entries)
                chunk = b"%x\r\n%b\r\n" % (len(body), body)
                for t in clients.get(key, ()):
                    t.write(chunk)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup
            task = asyncio.create_task(xread_loop())
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            task.cancel()
            await send({"type": "lifespan.shutdown.complete"})
            return
        path: str = scope["path"]
        if path == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        key = keys.session(path.split("/")[3]).stream.encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        transport = send.__self__.transport  # uvicorn's cycle: below ASGI send
        if key not in cursors:
            cursors[key] = b"0-0"  # ("$" per call would drop what lands between calls)
            wake.set()
        clients.setdefault(key, []).append(transport)
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            clients[key].remove(transport)

    return app


# -- client side ---------------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.events = 0
        self.latencies: list[float] = []
        self.recording = False
        self.connected = 0
        self.errors = 0
        self.appended = 0  # while recording: did the load generator keep its rate?


class Client(asyncio.Protocol):
    def __init__(self, request: bytes, stats: Stats, ready: asyncio.Future[bool]) -> None:
        self.request = request
        self.stats = stats
        self.ready = ready
        self.head = b""
        self.body = False
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.body:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.body = True
            ok = head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")
            if ok:
                self.stats.connected += 1
            else:
                self.stats.errors += 1
            if not self.ready.done():
                self.ready.set_result(ok)
        # events can straddle reads: only look at complete lines
        data = self.tail + data
        cut = data.rfind(b"\n")
        self.tail = data[cut + 1:]
        data = data[: cut + 1]
        if not self.stats.recording:
            return
        now = time.time()
        found = _T.findall(data)
        self.stats.events += len(found)
        self.stats.latencies += [now - float(t) for t in found]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.stats.errors += 1
            self.ready.set_result(False)


async def connect_all(port: int, paths: list[str], stats: Stats) -> list[asyncio.Transport]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(200)
    transports: list[asyncio.Transport] = []

    async def one(path: str) -> None:
        async with sem:
            fut: asyncio.Future[bool] = loop.create_future()
            req = (f"GET {path} HTTP/1.0\r\nHost: b\r\nAuthorization: Bearer {API_KEY}\r\n"
                   "Accept: text/event-stream\r\n\r\n").encode()
            try:
                t, _ = await loop.create_connection(lambda: Client(req, stats, fut),
                                                    "127.0.0.1", port)
                transports.append(t)  # type: ignore[arg-type]
                await asyncio.wait_for(fut, 30)
            except (OSError, TimeoutError):
                stats.errors += 1

    await asyncio.gather(*(one(p) for p in paths))
    return transports


async def connect_ws(port: int, sessions: list[str], stats: Stats) -> list[Any]:
    """WebSocket clients: each sends its hello, then records the latency of every envelope."""
    from websockets.asyncio.client import connect

    sem = asyncio.Semaphore(200)
    conns: list[Any] = []

    async def reader(ws: Any) -> None:
        async for msg in ws:
            if stats.recording:
                now = time.time()
                found = _T.findall(msg if isinstance(msg, bytes) else msg.encode())
                stats.events += len(found)
                stats.latencies += [now - float(t) for t in found]

    async def one(sid: str) -> None:
        async with sem:
            try:
                ws = await connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/ws",
                                   subprotocols=["eventcore.v1",  # type: ignore[list-item]
                                                 f"eventcore.token.{API_KEY}"],
                                   max_size=None, open_timeout=30, ping_interval=None)
                await ws.send(json.dumps({"type": "hello", "after": 1}))
                ready = json.loads(await ws.recv())
                assert ready["type"] == "ready", ready
            except (OSError, TimeoutError, AssertionError):
                stats.errors += 1
                return
            stats.connected += 1
            conns.append((ws, asyncio.create_task(reader(ws))))

    await asyncio.gather(*(one(s) for s in sessions))
    return conns


class Appender:
    """The load generator in a process of its own (``--append``), so that the clients' reads
    in this process do not hold its rate back: every session gets ``rate`` events/s, spread
    evenly over 10 ms ticks, one ``append_many`` per tick. ``counted`` is what it appended
    while ``recording``."""

    def __init__(self, redis_url: str, namespace: str, sessions: list[str], rate: float
                 ) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.recording = ctx.Value("b", 0)
        self.stop = ctx.Value("b", 0)
        self.count = ctx.Value("q", 0)
        self.proc = ctx.Process(target=_append_main, daemon=True, args=(
            redis_url, namespace, sessions, rate, self.recording, self.stop, self.count))
        self.proc.start()

    def record(self, on: bool) -> None:
        self.recording.value = int(on)

    @property
    def counted(self) -> int:
        return int(self.count.value)

    async def close(self) -> None:
        self.stop.value = 1
        await asyncio.to_thread(self.proc.join, 15)
        if self.proc.is_alive():
            self.proc.kill()
            raise SystemExit("sse.py: the appender did not stop within 15 s")
        if self.proc.exitcode != 0:
            raise SystemExit(f"sse.py: the appender failed (exit {self.proc.exitcode})")


def _append_main(redis_url: str, namespace: str, sessions: list[str], rate: float,
                 recording: Any, stop: Any, count: Any) -> None:
    sys.path.insert(0, str(ROOT))
    asyncio.run(_append_loop(redis_url, namespace, sessions, rate, recording, stop, count))


async def _append_loop(redis_url: str, namespace: str, sessions: list[str], rate: float,
                       recording: Any, stop: Any, count: Any) -> None:
    from eventcore import Envelope, EventLog, load_settings

    settings = load_settings(redis_url=redis_url, namespace=namespace, shards=16)
    async with EventLog(settings) as log:
        tick = 0.01
        per_tick = len(sessions) * rate * tick
        owed = 0.0
        i = 0
        next_at = time.monotonic()
        while not stop.value:
            owed += per_tick
            batch = []
            while owed >= 1:
                owed -= 1
                batch.append(sessions[i % len(sessions)])
                i += 1
            if batch:
                now = time.time()
                await log.append_many([Envelope(type="tick", session_id=s, payload={"t": now})
                                       for s in batch])
                if recording.value:
                    count.value += len(batch)
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def scenario(mode: str, redis_url: str, clients: int, per_session: int, rate: float,
                   warmup: float, duration: float) -> dict[str, Any]:
    bound = warmup + duration + 90  # connect, warm up, measure, stop: or fail loudly
    try:
        return await asyncio.wait_for(_scenario(mode, redis_url, clients, per_session, rate,
                                                warmup, duration), bound)
    except TimeoutError:
        raise SystemExit(f"sse.py: {mode} at {clients} clients x {rate:g} ev/s did not finish "
                         f"within {bound:.0f} s") from None


async def _scenario(mode: str, redis_url: str, clients: int, per_session: int, rate: float,
                    warmup: float, duration: float) -> dict[str, Any]:
    import psutil

    from eventcore import EventLog, load_settings
    from eventcore.testing._server import free_port

    namespace = f"b{uuid.uuid4().hex[:8]}"
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - before any load; startup is not measured
        [sys.executable, __file__, "--serve", mode, str(port), redis_url, namespace],
        stdin=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    try:
        import httpx

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)  # noqa: ASYNC210
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
        settings = load_settings(redis_url=redis_url, namespace=namespace, shards=16)
        async with EventLog(settings) as log:
            n_sessions = max(1, clients // per_session)
            sessions = [(await log.create_session(None)).session_id for _ in range(n_sessions)]
            stats = Stats()
            paths = [f"/v1/sessions/{sessions[i % n_sessions]}/events?after=1"
                     for i in range(clients)]
            t0 = time.monotonic()
            if mode == "ws":
                transports: list[Any] = []
                wss = await connect_ws(port, [sessions[i % n_sessions] for i in range(clients)],
                                       stats)
            else:
                transports = await connect_all(port, paths, stats)
                wss = []
            connect_s = time.monotonic() - t0
            load = Appender(redis_url, namespace, sessions, rate)
            await asyncio.sleep(warmup)
            user0, sys0 = ps.cpu_times()[:2]
            xread0 = await _xread_calls(log)
            me = psutil.Process()
            my0 = sum(me.cpu_times()[:2])
            stats.recording = True
            load.record(True)
            t1 = time.monotonic()
            await asyncio.sleep(duration)
            stats.recording = False
            load.record(False)
            elapsed = time.monotonic() - t1
            stats.appended = load.counted
            user1, sys1 = ps.cpu_times()[:2]
            user, system = user1 - user0, sys1 - sys0  # Python and the loop / the kernel
            cpu = user + system
            xreads = await _xread_calls(log) - xread0
            my_cpu = sum(me.cpu_times()[:2]) - my0
            await load.close()
            for t in transports:
                t.close()
            for ws, task in wss:
                task.cancel()
                ws.transport.abort()
        lat = stats.latencies
        return {
            "clients": clients, "rate_per_client": rate, "connected": stats.connected,
            "errors": stats.errors,
            "sessions": n_sessions, "expected_events_per_s": round(clients * rate),
            "appended_events_per_s": round(stats.appended / elapsed),
            "delivered_events_per_s": round(stats.events / elapsed),
            "xread_calls_per_s": round(xreads / elapsed),
            "p50_ms": round(pct(lat, 0.50) * 1000, 2), "p99_ms": round(pct(lat, 0.99) * 1000, 2),
            "max_ms": round(max(lat) * 1000, 2) if lat else None,
            "server_cpu_s_per_s": round(cpu / elapsed, 2),
            "server_cpu_us_per_delivery": round(cpu / stats.events * 1e6, 1)
            if stats.events else None,
            # of which in the kernel (socket writes: what no user-space change removes)
            "server_sys_us_per_delivery": round(system / stats.events * 1e6, 1)
            if stats.events else None,
            "client_cpu_s_per_s": round(my_cpu / elapsed, 2), "connect_s": round(connect_s, 2),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _xread_calls(log: Any) -> int:
    stats = await log.redis.info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for key in ("appended_events_per_s", "xread_calls_per_s",
                "delivered_events_per_s", "p50_ms", "p99_ms", "max_ms", "server_cpu_s_per_s",
                "server_cpu_us_per_delivery", "server_sys_us_per_delivery", "client_cpu_s_per_s",
                "connect_s", "connected", "errors"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    out["runs"] = len(runs)
    return out


# issue 11's targets at 1000 clients: latency and CPU at 10 ev/s per client, throughput at the
# --high-rate row
TARGET_P99_MS = 10.0
TARGET_CPU_US = 15.0
TARGET_DELIVERED = 50_000
TARGET_P99_AT_RATE_MS = 50.0


def _targets(m: dict[str, Any], hi: dict[str, Any] | None) -> dict[str, Any]:
    p99, cpu = m["p99_ms"], m.get("server_cpu_us_per_delivery")
    out: dict[str, Any] = {
        f"p99_le_{TARGET_P99_MS:g}ms_at_1000_clients": {
            "value_ms": p99, "met": p99 is not None and p99 <= TARGET_P99_MS},
        f"cpu_le_{TARGET_CPU_US:g}us_per_delivery": {
            "value_us": cpu, "met": cpu is not None and cpu <= TARGET_CPU_US},
    }
    key = f"delivered_ge_{TARGET_DELIVERED}_per_s_with_p99_le_{TARGET_P99_AT_RATE_MS:g}ms"
    if hi is None:
        out[key] = {"met": None, "note": "not measured: run with --high-rate"}
    else:
        rate, hp99 = hi["delivered_events_per_s"], hi["p99_ms"]
        out[key] = {"rate_per_client": hi["rate_per_client"], "delivered_per_s": rate,
                    "p99_ms": hp99, "server_cpu_us_per_delivery":
                    hi.get("server_cpu_us_per_delivery"),
                    "met": rate >= TARGET_DELIVERED and hp99 is not None
                    and hp99 <= TARGET_P99_AT_RATE_MS}
    return out


def _ratios(m: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    def ratio(key: str, digits: int = 3) -> float | None:
        a, b = m.get(key), base.get(key)
        return round(a / b, digits) if a and b else None

    return {"delivered_ratio": ratio("delivered_events_per_s", 2),
            "p50_ratio": ratio("p50_ms"), "p99_ratio": ratio("p99_ms"),
            "cpu_per_delivery_ratio": ratio("server_cpu_us_per_delivery")}


async def main(args: argparse.Namespace) -> None:
    from eventcore.testing._server import RedisServer

    modes = args.modes.split(",")
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()}, "rate_per_client": args.rate,
        "clients_per_session": args.per_session, "duration_s": args.duration,
        "repeat": args.repeat, "scenarios": [],
    }
    with RedisServer(appendonly=False, extra=("--maxclients", "20000")) as redis:
        for n in [int(x) for x in args.clients.split(",")]:
            row: dict[str, Any] = {"clients": n}
            for mode in modes:
                runs = [await scenario(mode, redis.url, n, args.per_session, args.rate,
                                       args.warmup, args.duration) for _ in range(args.repeat)]
                row[mode] = median_of(runs)
                print(f"# {n} clients {mode}: {json.dumps(row[mode])}", file=sys.stderr)
            for ref in ("baseline", "floor", "xread-queued"):  # side by side, same run
                base = row.get(ref)
                for mode in modes:
                    if mode == ref or not base or mode in ("baseline", "floor"):
                        continue
                    row[f"{mode}_vs_{ref}"] = _ratios(row[mode], base)
            if n == 1000:
                hi: dict[str, Any] = {}
                if args.high_rate:
                    for mode in modes:
                        if mode == "baseline":
                            continue  # it cannot keep up at 10 ev/s already
                        runs = [await scenario(mode, redis.url, n, args.per_session,
                                               args.high_rate, args.warmup, args.duration)
                                for _ in range(args.repeat)]
                        hi[mode] = median_of(runs)
                        print(f"# {n} clients {mode} at {args.high_rate:g} ev/s: "
                              f"{json.dumps(hi[mode])}", file=sys.stderr)
                    row["high_rate"] = hi
                row["targets"] = {mode: _targets(row[mode], hi.get(mode)) for mode in modes
                                  if mode != "baseline"}
                for mode, ts in row["targets"].items():
                    for name, t in ts.items():
                        shown = {k: v for k, v in t.items() if k != "met"}
                        print(f"# target {mode} {name}: {json.dumps(shown)} -> "
                              f"{'met' if t['met'] else 'NOT met'}", file=sys.stderr)
            results["scenarios"].append(row)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        if os.environ.get("SSE_BENCH_PROFILE"):  # where does the server's time go?
            import cProfile

            # uvicorn re-raises the signal it stopped for; make that a no-op so stats get saved
            signal.signal(signal.SIGTERM, lambda *_: None)
            cProfile.run("run_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])",
                         os.environ["SSE_BENCH_PROFILE"] + f".{sys.argv[2]}")
        else:
            run_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        raise SystemExit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="100,1000,5000")
    p.add_argument("--modes", default="pubsub,xread,floor,baseline")
    p.add_argument("--rate", type=float, default=10.0, help="events/s per session")
    p.add_argument("--per-session", type=int, default=10, help="clients per session")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--high-rate", type=float, default=50.0,
                   help="events/s per session for the 1,000-client throughput row (0: skip)")
    asyncio.run(main(p.parse_args()))
