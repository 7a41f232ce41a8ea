"""Helpers for the worker tests: watching the shard feeds, worker processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from eventcore import Envelope, EventLog, decode_payload
from eventcore._codec import decode_entry
from eventcore._redis import is_cluster

if TYPE_CHECKING:
    from eventcore.workers import Worker

HERE = Path(__file__).parent
EVENTCORE = str(Path(sys.executable).parent / "eventcore")
# waits are on events; this bound only turns a hang into a failure
SAFETY_S = float(os.environ.get("EC_TEST_SAFETY_S", "60"))


class FeedWatcher:
    """Every envelope appended in the namespace, per session, read live from the shard feeds
    over one connection. ``await until(pred)`` wakes on each new batch."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.events: dict[str, list[Envelope]] = defaultdict(list)
        self._changed = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        keys = self.log.keys
        last: dict[Any, Any] = {keys.feed(s): "0-0" for s in keys.all_shards()}
        task_status.started()
        if not is_cluster(self.log.redis):
            while True:
                got = await self.log.redis.xread(last, count=1000, block=500)
                self._take(got or (), last)
        # a cluster: one XREAD per feed (the feeds are on different slots), pipelined (one round
        # trip per node, so the watcher's connections do not grow with the shards) and polled
        feeds = list(last)
        while True:
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for f in feeds:
                    pipe.xread({f: last[f]}, count=1000)
                replies = await pipe.execute()
            if not self._take([r for reply in replies for r in reply or ()], last):
                await anyio.sleep(0.02)

    def _take(self, got: Any, last: dict[Any, Any]) -> bool:
        for stream, entries in got:
            for eid, fields in entries:
                env = decode_entry(fields)
                self.events[env.session_id].append(env)
                last[stream.decode() if isinstance(stream, bytes) else stream] = eid
        if got:
            ev, self._changed = self._changed, anyio.Event()
            ev.set()
        return bool(got)

    async def until(self, pred: Callable[[], bool], within: float = SAFETY_S) -> None:
        with anyio.fail_after(within):
            while not pred():
                await self._changed.wait()

    def of(self, sid: str, type: str | None = None) -> list[Envelope]:
        return [e for e in self.events.get(sid, []) if type is None or e.type == type]

    def count(self, sid: str, type: str) -> int:
        return sum(1 for e in self.events.get(sid, []) if e.type == type)


@asynccontextmanager
async def watching(log: EventLog) -> AsyncIterator[FeedWatcher]:
    watcher = FeedWatcher(log)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        yield watcher
        tg.cancel_scope.cancel()


async def eventually(pred: Callable[[], Any], within: float = SAFETY_S,
                     interval: float = 0.02) -> None:
    """For state with no event to await (meta fields, metrics): poll a condition."""
    with anyio.fail_after(within):
        while not await _call(pred):  # noqa: ASYNC110 - nothing to await but the state itself
            await anyio.sleep(interval)


async def _call(pred: Callable[[], Any]) -> Any:
    out = pred()
    if hasattr(out, "__await__"):
        out = await out
    return out


def ended_reason(env: Envelope) -> str:
    return str(decode_payload(env).reason)


class WorkerProc:
    """A real ``eventcore worker worker_apps:app`` process."""

    def __init__(self, log: EventLog, *args: str, env: dict[str, str] | None = None) -> None:
        s = log.settings
        self.env = {
            **os.environ,
            "EVENTCORE_REDIS_URL": str(s.redis_url),
            "EVENTCORE_NAMESPACE": s.namespace,
            "EVENTCORE_SHARDS": str(s.shards),
            "EVENTCORE_RETRY_BUDGET_S": "5",
            **(env or {}),
        }
        self.args = [EVENTCORE, "worker", "worker_apps:app", "--log-level", "WARNING", *args]
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.info: dict[str, Any] = {}
        self.final: dict[str, Any] = {}
        self._pumps: list[threading.Thread] = []

    def start(self) -> WorkerProc:
        self.proc = subprocess.Popen(self.args, cwd=HERE, env=self.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._pumps = [threading.Thread(target=self._pump, args=(stream, out), daemon=True)
                       for stream, out in ((self.proc.stdout, True), (self.proc.stderr, False))]
        for t in self._pumps:
            t.start()
        return self

    def _pump(self, stream: Any, out: bool) -> None:
        for line in stream:
            if out:
                self.lines.put(line)
            else:
                self.stderr.append(line)

    async def ready(self) -> WorkerProc:
        self.info = await self._event("ready")
        return self

    async def _event(self, name: str) -> dict[str, Any]:
        def wait() -> dict[str, Any]:
            while True:
                try:
                    line = self.lines.get(timeout=SAFETY_S)
                except queue.Empty:
                    raise AssertionError(
                        f"worker never printed {name!r}; stderr:\n{''.join(self.stderr)}"
                    ) from None
                data = json.loads(line)
                if data.get("event") == name:
                    return dict(data)

        return await anyio.to_thread.run_sync(wait)

    @property
    def id(self) -> str:
        return str(self.info["worker_id"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, within: float = SAFETY_S) -> int:
        assert self.proc is not None
        proc = self.proc
        try:
            code = await anyio.to_thread.run_sync(lambda: proc.wait(within))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running after {within} s; stderr:\n{''.join(self.stderr)}"
            ) from None
        return int(code)

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, wait for exit, return the final metrics line."""
        self.signal(signal.SIGTERM)
        self.final = await self._event("stopped")
        assert await self.wait() == 0, "".join(self.stderr)
        return self.final

    def kill(self) -> None:
        """SIGKILL (if still running) and release the pipes."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._pumps:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@dataclass(frozen=True)
class DispatchState:
    """What the dispatch streams hold against what a worker hosts."""

    #: entries never delivered to any consumer (after the group's last-delivered id), and
    #: XINFO GROUPS ``lag`` summed (None where Redis cannot tell)
    lag: int
    reported_lag: int | None
    #: pending (delivered, unacknowledged) entries no session hosted by the worker holds
    unhosted_pending: int
    pending: int
    hosted: int
    free: int
    backlog: int


async def dispatch_state(w: Worker) -> DispatchState:
    log, keys, group = w.log, w.log.keys, "workers"
    streams = [keys.dispatch(shard) for shard in keys.all_shards()]
    async with log.redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        infos = [next(g for g in groups if g["name"] in (group, group.encode()))
                 for groups in await pipe.execute()]
    async with log.redis.pipeline(transaction=False) as pipe:
        for stream, info in zip(streams, infos, strict=True):
            pipe.xrange(stream, b"(" + info["last-delivered-id"], "+")
            pipe.xpending_range(stream, group, "-", "+", 100_000)
        replies = await pipe.execute()
    lags = [None if i.get("lag") is None else int(i["lag"]) for i in infos]
    # entry ids are unique per stream only
    pending = {(shard, p["message_id"]) for shard, page in enumerate(replies[1::2])
               for p in page}
    hosts = list(w._hosts.values())
    held = {(s.shard, s.entry_id.encode()) for s in hosts}
    return DispatchState(
        lag=sum(len(undelivered) for undelivered in replies[0::2]),
        reported_lag=None if None in lags else sum(x for x in lags if x is not None),
        pending=len(pending), unhosted_pending=len(pending - held), hosted=len(hosts),
        free=w.concurrency - w.active, backlog=len(w._backlog))


async def nothing_waits_for_a_free_slot(w: Worker, within: float) -> DispatchState:
    """The dispatch invariant: while ``w`` has a free slot, no entry stays undelivered (lag)
    or delivered but hosted by no session (pending). It must hold within ``within`` s (the
    time a read and a claim take); otherwise fail with the counts."""
    with anyio.move_on_after(within):
        while True:
            state = await dispatch_state(w)
            if state.free <= 0 or state.lag + state.unhosted_pending == 0:
                return state
            await anyio.sleep(0.02)  # nothing to await: the state is in Redis and the worker
    raise AssertionError(f"free slots but entries waiting after {within} s: "
                         f"{await dispatch_state(w)}")


async def hosted_within(w: Worker, sids: Collection[str], within: float) -> None:
    """Every one of ``sids`` is hosted by ``w`` within ``within`` s; otherwise fail with the
    counts (hosted, lag, pending) instead of hanging."""
    with anyio.move_on_after(within):
        while not all(sid in w._hosts for sid in sids):  # noqa: ASYNC110 - worker state
            await anyio.sleep(0.02)
        return
    state = await dispatch_state(w)
    missing = sum(1 for sid in sids if sid not in w._hosts)
    raise AssertionError(f"{missing} of {len(sids)} sessions not hosted after {within} s: "
                         f"{state}")
