"""The soak's parts: the deployment (API, workers, a SQLite history process, a PostgreSQL
database of its own), SSE clients that check what they are sent, the input driver and the
sampler. ``test_soak.py`` puts them together."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import anyio
import asyncpg
import h11
import httpx
import msgspec
import psutil
from anyio.abc import SocketStream, TaskGroup
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from eventcore import EventLog
from eventcore._groups import ConsumerGroup
from eventcore._streams import ShardStreams
from eventcore.testing._server import free_port

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
API_KEY = "soak-api-key-" + "k" * 24
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
GROUPS = ("projector", "persistence", "persistence-sqlite")
TEXT = "soak " * 12


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(f"EC_SOAK_{name}", default))


@dataclass(frozen=True)
class Knobs:
    """The soak's dimensions; ``EC_SOAK_<NAME>`` overrides each (e.g. ``EC_SOAK_SECONDS=600``)."""

    seconds: float = _env_float("SECONDS", 300)  # the sustained phase
    fraction: float = _env_float("FRACTION", 0.4)  # of the measured input capacity
    burst_s: float = _env_float("BURST_S", 15)  # the capacity measurement
    burst_concurrency: int = int(_env_float("BURST_CONCURRENCY", 64))
    clients: int = int(_env_float("CLIENTS", 200))  # SSE clients
    per_session: int = int(_env_float("PER_SESSION", 2))  # SSE clients per session
    workers: int = int(_env_float("WORKERS", 2))
    session_life_s: float = _env_float("SESSION_LIFE_S", 60)  # then the session ends, a new one
    # subscriber backlog, in seconds of appends: never above lag_bound_s, and back under
    # caught_up_s at least once every recover_s (a stage that cannot keep up never is)
    lag_bound_s: float = _env_float("LAG_BOUND_S", 30)
    caught_up_s: float = _env_float("CAUGHT_UP_S", 2)
    recover_s: float = _env_float("RECOVER_S", 60)
    sample_s: float = _env_float("SAMPLE_S", 3)
    settle_s: float = _env_float("SETTLE_S", 180)  # most a backlog may take to drain
    hot_window_s: float = 10
    retention_interval_s: float = 5
    session_ttl_s: int = 20

    @property
    def sessions(self) -> int:
        return max(1, self.clients // self.per_session)


# -- processes ------------------------------------------------------------------------------------
class Child:
    """One process of the deployment, output to a log file, run from this directory."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.logfile = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=HERE, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def json_lines(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                out.append(json.loads(line))
        return out

    async def ready(self, check: Callable[[], Any], within: float = 60.0) -> None:
        """Poll ``check`` (a child process has no readiness signal but its own output)."""
        with anyio.fail_after(within):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start:\n{self.text()[-3000:]}")
                got = check()
                if hasattr(got, "__await__"):
                    got = await got
                if got:
                    return
                await anyio.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Deployment:
    """What an operator runs: ``eventcore serve`` (API, SSE hub, projector, persistence into
    PostgreSQL, retention), ``eventcore worker`` processes, and a second history process into
    SQLite; all on one redis-server."""

    url: str
    env: dict[str, str]
    api: Child
    workers: list[Child]
    history: Child
    pg_url: str
    sqlite_url: str
    redis_pid: int

    @property
    def children(self) -> list[Child]:
        return [self.api, *self.workers, self.history]


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def deployment(redis_url: str, redis_pid: int, knobs: Knobs, tmp: Path
                     ) -> AsyncIterator[Deployment]:
    db = f"soak_{uuid.uuid4().hex[:10]}"
    await _pg_admin(f'CREATE DATABASE "{db}"')
    pg_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db}"
    sqlite_url = f"sqlite+aiosqlite:///{tmp / 'history.sqlite3'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    env.update({
        "EVENTCORE_REDIS_URL": redis_url,
        "EVENTCORE_NAMESPACE": "soak",
        "EVENTCORE_API_KEY": API_KEY,
        "EVENTCORE_DATABASE_URL": pg_url,
        "EVENTCORE_DATA_DIR": str(tmp / "data"),
        "EVENTCORE_SESSION_TTL_S": str(knobs.session_ttl_s),
        "EVENTCORE_HOT_WINDOW_S": str(knobs.hot_window_s),
        "EVENTCORE_RETENTION_INTERVAL_S": str(knobs.retention_interval_s),
    })
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    eventcore = str(BIN / "eventcore")
    api = Child("api", [eventcore, "serve", "soak_agents:app", "--port", str(port),
                        "--log-level", "warning"], env, tmp)
    workers = [Child(f"worker{i}", [eventcore, "worker", "soak_agents:app", "--log-level",
                                    "WARNING"], env, tmp) for i in range(knobs.workers)]
    history = Child("history", [sys.executable, str(HERE / "sqlite_history.py"), sqlite_url],
                    env, tmp)
    dep = Deployment(url, env, api, workers, history, pg_url, sqlite_url, redis_pid)
    try:
        api.start()

        async def api_ready() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as c:
                    return (await c.get(url + "/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await api.ready(api_ready)
        for child in (*workers, history):
            child.start()
        for child in (*workers, history):
            await child.ready(lambda c=child: c.json_lines("ready"))  # type: ignore[misc]
        yield dep
    finally:
        for child in reversed(dep.children):
            child.stop()
        with anyio.CancelScope(shield=True):
            await _pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# -- SSE clients ----------------------------------------------------------------------------------
def canonical(data: bytes | str) -> bytes:
    """An envelope's JSON with sorted keys: what an SSE client got and what a database stored
    compare equal whatever the key order of the encoder that wrote them."""
    return msgspec.json.encode(msgspec.json.decode(data), order="sorted")


@dataclass
class Seen:
    """What one SSE client saw of its session."""

    last: int = 0
    events: int = 0
    ended: int | None = None
    reconnects: int = 0
    problems: list[str] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    inputs: set[int] = field(default_factory=set)
    answers: set[int] = field(default_factory=set)
    done: anyio.Event = field(default_factory=anyio.Event)


class Window:
    """Maxima since the sampler last looked."""

    def __init__(self) -> None:
        self.sse_lag_s = 0.0
        self.answer_s = 0.0

    def take(self) -> dict[str, float]:
        out = {"sse_lag_s": round(self.sse_lag_s, 3), "answer_s": round(self.answer_s, 3)}
        self.sse_lag_s = self.answer_s = 0.0
        return out


@dataclass
class Tracked:
    """One session of the soak: the inputs the API acknowledged and what its clients saw."""

    sid: str
    token: str
    next_input: int = 0
    acked: dict[int, float] = field(default_factory=dict)  # input seq -> acknowledged at
    answered: dict[int, float] = field(default_factory=dict)  # input seq -> answer seen at
    clients: list[Seen] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ending: bool = False


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- HTTP clients ---------------------------------------------------------------------------------
# The load generator shares the two cores with what it loads, so its clients must be cheap:
# measured here, an httpx request costs ~2 ms of CPU and an event read through httpx-sse ~300 us,
# which made the test process the limiting stage. h11 (the HTTP/1.1 state machine under httpx)
# and httpx-sse's own SSE decoders do the wire formats; these classes only move the bytes.
_NET_ERRORS = (OSError, anyio.EndOfStream, anyio.BrokenResourceError, h11.ProtocolError)


class Http1:
    """One keep-alive HTTP/1.1 connection, reopened after a failure."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._stream: SocketStream | None = None
        self._conn = h11.Connection(h11.CLIENT)

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes = b"") -> tuple[int, bytes]:
        """Status and body; raises ``ConnectionError`` when the connection failed. A kept-alive
        connection the server closed while idle (uvicorn closes them after 5 s) is reopened
        and the request sent again once, as HTTP clients do: the server never read it."""
        reused = self._stream is not None
        try:
            return await self._exchange(method, target, headers, body)
        except ConnectionError as exc:
            if not (reused and isinstance(exc.__cause__, (anyio.EndOfStream,
                                                          anyio.BrokenResourceError))):
                raise
        return await self._exchange(method, target, headers, body)

    async def _exchange(self, method: str, target: str, headers: list[tuple[str, str]],
                        body: bytes) -> tuple[int, bytes]:
        try:
            if self._stream is None:
                self._stream = await anyio.connect_tcp(self.host, self.port)
                self._conn = h11.Connection(h11.CLIENT)
            conn = self._conn
            head = [("Host", self.host), ("Content-Length", str(len(body))), *headers]
            await self._stream.send(conn.send(h11.Request(method=method, target=target,
                                                          headers=head))
                                    + conn.send(h11.Data(data=body))
                                    + conn.send(h11.EndOfMessage()))
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self._stream.receive(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise anyio.EndOfStream
            conn.start_next_cycle()
            return status, b"".join(chunks)
        except _NET_ERRORS as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            with anyio.CancelScope(shield=True):  # a half-read response poisons the connection
                await self.aclose()
            raise


async def sse_events(host: str, port: int, target: str, headers: list[tuple[str, str]],
                     status: list[int]) -> AsyncIterator[ServerSentEvent]:
    """The events of one SSE response (``status`` gets the response's status first); ends
    when the server closes the stream."""
    stream = await anyio.connect_tcp(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send(conn.send(h11.Request(method="GET", target=target, headers=[
            ("Host", host), ("Accept", "text/event-stream"), *headers]))
            + conn.send(h11.EndOfMessage()))
        lines, decoder = SSELineDecoder(), SSEDecoder()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status.append(event.status_code)
            elif isinstance(event, h11.Data):
                for line in lines.decode(bytes(event.data).decode()):
                    sse = decoder.decode(line)
                    if sse is not None:
                        yield sse
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return


async def follow(url: str, s: Tracked, seen: Seen, window: Window, primary: bool) -> None:
    """Follow one session over SSE until ``session.ended``, as a browser's EventSource would:
    reconnect with ``Last-Event-ID`` when the server closes the stream. Unlike ``eventcore tail``
    (which drops repeats), it records every gap, duplicate and reset the server sends."""
    host, port = url.removeprefix("http://").split(":")
    target = f"/v1/sessions/{s.sid}/events"
    try:
        while seen.ended is None:
            headers = [("Authorization", f"Bearer {s.token}")]
            if seen.last:
                headers.append(("Last-Event-ID", str(seen.last)))
            status: list[int] = []
            try:
                async for sse in sse_events(host, int(port), target, headers, status):
                    if sse.event in ("server.shutdown", "stream.reset"):
                        seen.problems.append(f"{sse.event} after {seen.last}: {sse.data}")
                        continue
                    _take(s, seen, window, int(sse.id), sse.event, sse.data, primary)
                    if seen.ended is not None:
                        return
                if status and status[0] != 200:
                    seen.problems.append(f"HTTP {status[0]} at seq {seen.last}")
                    if status[0] < 500:
                        return
            except _NET_ERRORS as exc:
                seen.problems.append(f"{type(exc).__name__} after seq {seen.last}: {exc}")
            seen.reconnects += 1
            await anyio.sleep(0.5)  # reconnect backoff (EventSource waits its retry time too)
    finally:
        seen.done.set()


def _take(s: Tracked, seen: Seen, window: Window, seq: int, type: str, data: str,
          primary: bool) -> None:
    if seq <= seen.last:
        seen.problems.append(f"duplicate seq {seq} after {seen.last}")
        return
    if seq != seen.last + 1:
        seen.problems.append(f"gap: seq {seq} after {seen.last}")
    seen.last = seq
    seen.events += 1
    seen.digest.update(canonical(data) + b"\n")
    if type == "input":
        seen.inputs.add(seq)
    if type == "session.ended":
        seen.ended = seq
    if not primary:
        return
    env = msgspec.json.decode(data)
    now = time.time()
    window.sse_lag_s = max(window.sse_lag_s, now - _ts(env["ts"]))
    if type == "message":
        answer = env["payload"]["answer"]
        seen.answers.add(answer)
        s.answered[answer] = now
        if answer in s.acked:
            window.answer_s = max(window.answer_s, now - s.acked[answer])


# -- the input driver -----------------------------------------------------------------------------
class Driver:
    """Creates sessions (each followed by ``per_session`` SSE clients) and posts their inputs
    through the API, as clients with session tokens do. Use it as ``async with``: the SSE
    clients run in its task group."""

    def __init__(self, url: str, knobs: Knobs) -> None:
        self.url = url
        self.knobs = knobs
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.sessions: dict[str, Tracked] = {}
        self.window = Window()
        self.problems: list[str] = []
        self.acked = 0
        self._tg: TaskGroup | None = None
        self._conns: list[Http1] = []

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        """Stops the clients still following (every one has seen its session end, unless the
        soak failed) and closes the connections."""
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(*exc)
        finally:
            for conn in self._conns:
                await conn.aclose()

    def connection(self) -> Http1:
        """A connection for one posting task (they are not shared: one request at a time)."""
        conn = Http1(self.host, self.port)
        self._conns.append(conn)
        return conn

    async def create(self, conn: Http1) -> Tracked:
        status, body = await self._post(conn, "/v1/sessions", {"agent": "soak"}, API_KEY)
        assert status == 201, f"POST /v1/sessions: {status} {body[:300]!r}"
        got = json.loads(body)
        s = Tracked(got["session_id"], got["token"])
        self.sessions[s.sid] = s
        assert self._tg is not None
        for i in range(self.knobs.per_session):
            seen = Seen()
            s.clients.append(seen)
            self._tg.start_soon(follow, self.url, s, seen, self.window, i == 0)
        return s

    async def _post(self, conn: Http1, path: str, body: dict[str, Any], credential: str,
                    attempts: int = 8) -> tuple[int, bytes]:
        """POST, retried (same body, so the same idempotency key) on connection errors and
        5xx; every retry is recorded as a problem."""
        data = msgspec.json.encode(body)
        headers = [("Authorization", f"Bearer {credential}"),
                   ("Content-Type", "application/json")]
        status, answer = 0, b"no answer"
        for attempt in range(attempts):
            try:
                status, answer = await conn.request("POST", path, headers, data)
                if status < 500:
                    return status, answer
                self.problems.append(f"POST {path}: HTTP {status}: {answer[:200]!r}")
            except ConnectionError as exc:
                self.problems.append(f"POST {path}: {exc}")
            await anyio.sleep(0.2 * (attempt + 1))  # retry backoff
        return status, answer

    async def send(self, conn: Http1, s: Tracked, *, last: bool = False) -> None:
        n = s.next_input
        s.next_input += 1
        if last:
            s.ending = True
        status, body = await self._post(conn, f"/v1/sessions/{s.sid}/inputs",
                                        {"payload": {"text": TEXT, "last": last},
                                         "idempotency_key": f"i{n}"}, s.token)
        if status != 200:
            s.problems.append(f"input {n}: HTTP {status} {body[:200]!r}")
            return
        got = json.loads(body)
        if got["duplicate"]:
            s.problems.append(f"input {n} was a duplicate (seq {got['seq']})")
        s.acked[got["seq"]] = time.time()
        self.acked += 1

    async def finish(self, conn: Http1, s: Tracked, within: float) -> None:
        """End the session with a last input and wait until its clients saw the end."""
        if not s.ending:
            await self.send(conn, s, last=True)
        with anyio.move_on_after(within) as scope:
            for seen in s.clients:
                await seen.done.wait()
        if scope.cancelled_caught:
            s.problems.append(f"clients did not see the end within {within} s: "
                              f"{[c.last for c in s.clients]}")

    def outstanding(self) -> int:
        return sum(len(s.acked.keys() - s.answered.keys()) for s in self.sessions.values())

    def answered(self) -> int:
        return sum(len(s.answered) for s in self.sessions.values())

    def sse_events(self) -> int:
        return sum(c.events for s in self.sessions.values() for c in s.clients)

    def live(self) -> list[Tracked]:
        return [s for s in self.sessions.values() if not all(c.done.is_set() for c in s.clients)]


# -- sampling -------------------------------------------------------------------------------------
def _runq_wait_s(pid: int) -> float:
    """Seconds the process's main thread spent runnable but waiting for a CPU (schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class Cpu:
    """CPU used per process of the deployment, in cores, between two calls; and how long each
    waited for a CPU it wanted (``waiting``: on a machine shared with other work, the part of a
    lag that is the machine's, not the process's)."""

    def __init__(self, pids: dict[str, int], pg_db: str) -> None:
        self.pids = pids
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.pg_db = pg_db
        self.last: dict[str, float] = {}
        self.last_wait: dict[str, float] = {}
        self.waiting: dict[str, float] = {}
        self.at = time.monotonic()
        self.take()

    def _pg(self) -> float:
        """PostgreSQL backends serving the soak's database (their titles name it)."""
        total = 0.0
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                if p.info["name"] == "postgres" and self.pg_db in " ".join(p.info["cmdline"]):
                    total += sum(p.cpu_times()[:2])
            except (psutil.Error, TypeError):
                continue
        return total

    def take(self) -> dict[str, float]:
        now = time.monotonic()
        used = {}
        for name, p in self.procs.items():
            try:
                used[name] = sum(p.cpu_times()[:2])
            except psutil.Error:
                used[name] = self.last.get(name, 0.0)
        used["postgres"] = self._pg()
        dt = max(now - self.at, 1e-6)
        # a backend that exited takes its time with it: never report negative use
        out = {k: round(max(0.0, v - self.last.get(k, v)) / dt, 3) for k, v in used.items()}
        wait = {name: _runq_wait_s(pid) for name, pid in self.pids.items()}
        self.waiting = {k: round(max(0.0, v - self.last_wait.get(k, v)) / dt, 3)
                        for k, v in wait.items()}
        self.last, self.last_wait, self.at = used, wait, now
        return out


class Sampler:
    """Every ``sample_s``: each consumer group's lag and pending, Redis memory and stream
    lengths, the append rate, CPU per process, the API's answer time to ``/healthz`` (its
    event loop's responsiveness) and the driver's backlog."""

    def __init__(self, log: EventLog, driver: Driver, cpu: Cpu, knobs: Knobs) -> None:
        self.log = log
        self.driver = driver
        self.cpu = cpu
        self.knobs = knobs
        self.samples: list[dict[str, Any]] = []
        self.phase = "start"
        feeds = ShardStreams(log.redis, log.keys.feed, log.keys.all_shards())
        self.groups = {g: ConsumerGroup(feeds, log.keys, g, "soak-sampler") for g in GROUPS}
        self._added: int | None = None
        self._probe = driver.connection()  # how long the API takes to answer anything
        self._at = time.monotonic()
        self._t0 = time.monotonic()

    async def lags(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, fg in self.groups.items():
            states = await fg.state()
            out[name] = {"lag": sum(s.lag or 0 for s in states if s.exists),
                         "pending": sum(s.pending for s in states if s.exists),
                         "missing": sum(1 for s in states if not s.exists)}
        return out

    async def sample(self) -> dict[str, Any]:
        redis, keys = self.log.redis, self.log.keys
        lags = await self.lags()
        mem = await redis.info("memory")
        async with redis.pipeline(transaction=False) as pipe:
            for shard in keys.all_shards():
                pipe.xinfo_stream(keys.feed(shard))
            live = self.driver.live()
            for s in live:
                pipe.xlen(keys.session(s.sid).stream)
            got = await pipe.execute(raise_on_error=False)
        feeds, streams = got[: len(keys.all_shards())], got[len(keys.all_shards()):]
        feed_info = [f for f in feeds if isinstance(f, dict)]
        added = sum(int(f.get("entries-added", 0)) for f in feed_info)
        now = time.monotonic()
        rate = None if self._added is None else (added - self._added) / (now - self._at)
        self._added, self._at = added, now
        t = time.monotonic()
        status, _ = await self._probe.request("GET", "/healthz", [])
        healthz_ms = round((time.monotonic() - t) * 1000, 1) if status == 200 else None
        d = self.driver
        row = {
            "t": round(now - self._t0, 1), "phase": self.phase,
            "groups": lags,
            "appended": added, "append_rate": None if rate is None else round(rate),
            "used_memory_mb": round(int(mem["used_memory"]) / 2**20, 2),
            "feed_len": sum(int(f.get("length", 0)) for f in feed_info),
            "session_stream_len": sum(int(n) for n in streams if isinstance(n, int)),
            "live_sessions": len(live),
            "inputs_acked": d.acked, "inputs_answered": d.answered(),
            "outstanding_inputs": d.outstanding(), "sse_events": d.sse_events(),
            "api_healthz_ms": healthz_ms,
            **d.window.take(),
            "cpu": self.cpu.take(),
            "cpu_wait": self.cpu.waiting,
        }
        self.samples.append(row)
        return row

    async def run(self) -> None:
        while True:
            await self.sample()
            await anyio.sleep(self.knobs.sample_s)

    async def trimmed(self, floor_feed: int, floor_streams: int, within: float) -> float:
        """Wait until retention has trimmed the feeds and the live sessions' streams to these
        lengths (everything older than the hot window is persisted by now); returns how long
        it took. Fails with the lengths if it does not."""
        t0 = time.monotonic()
        keys, redis = self.log.keys, self.log.redis
        lengths: tuple[int, int] = (0, 0)
        with anyio.move_on_after(within):
            while True:
                async with redis.pipeline(transaction=False) as pipe:
                    for shard in keys.all_shards():
                        pipe.xlen(keys.feed(shard))
                    for s in self.driver.live():
                        pipe.xlen(keys.session(s.sid).stream)
                    got = await pipe.execute()
                n = len(keys.all_shards())
                lengths = (sum(got[:n]), sum(got[n:]))
                if lengths[0] <= floor_feed and lengths[1] <= floor_streams:
                    return time.monotonic() - t0
                await anyio.sleep(0.5)  # nothing to await: retention runs in the API process
        raise AssertionError(f"retention left {lengths[0]} feed entries and {lengths[1]} "
                             f"session stream entries after {within} s")

    async def settle(self, within: float) -> float:
        """Wait until every group has delivered and acknowledged everything and every input
        was answered; returns how long it took. Fails with the backlog if it does not."""
        t0 = time.monotonic()
        last: dict[str, Any] = {}
        with anyio.move_on_after(within):
            while True:
                lags = await self.lags()
                last = {"groups": lags, "outstanding_inputs": self.driver.outstanding()}
                if (last["outstanding_inputs"] == 0
                        and all(v["lag"] == 0 and v["pending"] == 0 and v["missing"] == 0
                                for v in lags.values())):
                    return time.monotonic() - t0
                await anyio.sleep(0.5)  # nothing to await: the backlog lives in Redis
        raise AssertionError(f"the pipeline did not drain within {within} s: {last}")
