"""Helpers of the cluster tests of the group runtime: the worker test apps, sessions on every
master, the shard feeds watched per node, connections per node."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from eventcore import Envelope, EventLog
from eventcore._codec import decode_entry
from eventcore.testing._server import LocalCluster

WORKERS = Path(__file__).parent.parent / "workers"
SUBSCRIBERS = Path(__file__).parent.parent / "subscribers"
for _p in (WORKERS, SUBSCRIBERS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SAFETY_S = 60.0


def master_port(cluster: LocalCluster, key: str) -> int:
    return cluster.node_of_slot(cluster.keyslot(key)).port


def sessions_per_master(cluster: LocalCluster, log: EventLog, per: int, prefix: str
                        ) -> dict[int, list[str]]:
    """``per`` session ids served by each master (by port)."""
    out: dict[int, list[str]] = {n.port: [] for n in cluster.masters()}
    i = 0
    while any(len(v) < per for v in out.values()):
        sid = f"{prefix}-{i}"
        i += 1
        port = master_port(cluster, log.keys.session(sid).stream)
        if len(out[port]) < per:
            out[port].append(sid)
    return out


def clients_per_master(cluster: LocalCluster) -> dict[int, int]:
    """Client connections on each master now (the asking connection not counted)."""
    return {n.port: len(n.command("CLIENT", "LIST").splitlines()) - 1
            for n in cluster.masters()}


class ClusterFeedWatcher:
    """Every envelope appended in the namespace, read from the shard feeds: one pipelined
    XREAD (one slot per command) per poll, redis-py splitting it per node."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.events: dict[str, list[Envelope]] = defaultdict(list)
        self._changed = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        keys = self.log.keys
        feeds = [keys.feed(s) for s in keys.all_shards()]
        last = dict.fromkeys(feeds, "0-0")
        task_status.started()
        while True:
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for f in feeds:
                    pipe.xread({f: last[f]}, count=1000)
                replies = await pipe.execute()
            got = False
            for f, reply in zip(feeds, replies, strict=True):
                for _, entries in reply or ():
                    for eid, fields in entries:
                        env = decode_entry(fields)
                        self.events[env.session_id].append(env)
                        last[f] = eid.decode()
                        got = True
            if got:
                ev, self._changed = self._changed, anyio.Event()
                ev.set()
            else:
                await anyio.sleep(0.02)

    async def until(self, pred: Callable[[], bool], within: float = SAFETY_S) -> None:
        with anyio.fail_after(within):
            while not pred():
                await self._changed.wait()

    def of(self, sid: str, type: str | None = None) -> list[Envelope]:
        return [e for e in self.events.get(sid, []) if type is None or e.type == type]

    def count(self, sid: str, type: str) -> int:
        return sum(1 for e in self.events.get(sid, []) if e.type == type)


@asynccontextmanager
async def watching(log: EventLog) -> AsyncIterator[ClusterFeedWatcher]:
    watcher = ClusterFeedWatcher(log)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        yield watcher
        tg.cancel_scope.cancel()


async def eventually(pred: Callable[[], Any], within: float = SAFETY_S) -> None:
    """For state with no event to await: poll a condition."""
    with anyio.fail_after(within):
        while True:
            out = pred()
            if hasattr(out, "__await__"):
                out = await out
            if out:
                return
            await anyio.sleep(0.02)
