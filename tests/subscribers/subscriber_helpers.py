"""Helpers shared by the subscriber tests (a recording subscriber, log fillers, fast runner
settings)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus

from eventcore import Envelope, EventLog
from eventcore.subscribers import Delivery, OrderedSubscriber, Run

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


class Recorder:
    """A raw (at-least-once) subscriber that records what it handled, and fails on demand."""

    def __init__(self, name: str = "rec", fail: Callable[[Delivery], bool] | None = None) -> None:
        self.name = name
        self.fail = fail
        self.got: list[Delivery] = []
        self.calls = 0

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        self.calls += 1
        for d in deliveries:
            if self.fail is not None and self.fail(d):
                raise ValueError(f"poison: {d.session_id} seq {d.seq}")
        self.got += deliveries

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [(d.session_id, d.seq) for d in self.got]


async def populate(log: EventLog, sessions: int, events: int, agent: str | None = None,
                   ) -> dict[str, int]:
    """``sessions`` sessions with ``events`` message envelopes each (after session.created);
    returns session id -> last seq."""
    out = {}
    for _ in range(sessions):
        s = await log.create_session(agent)
        res = await log.append_many([
            Envelope(type="message", session_id=s.session_id, payload={"i": i})
            for i in range(events)
        ])
        out[s.session_id] = res[-1].seq if res else 1
    return out


def all_keys(last: dict[str, int]) -> set[tuple[str, int]]:
    return {(sid, seq) for sid, top in last.items() for seq in range(1, top + 1)}


def fast(**overrides: Any) -> dict[str, Any]:
    """Runner settings for tests: short blocks, quick retries and reclaims."""
    base: dict[str, Any] = dict(block_ms=50, backoff_s=(0.001, 0.01), claim_idle_ms=200,
                                metrics_interval_s=0.05)
    base.update(overrides)
    return base


_APPLY_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if cur ~= tonumber(ARGV[2]) then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
for i = 4, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. ARGV[i]) end
return -1
"""


class AppliedLog(OrderedSubscriber):
    """An exactly-once witness: applying a run appends "<sid> <seq>" to a Redis list in the same
    script that moves the session's position (``Keys.applied``), so the list shows every
    application that ever happened, across processes."""

    name = "exact"

    def list_key(self, shard: int) -> str:
        return self.log.keys.applied(self.name, shard) + ":list"

    async def positions(self, session_ids: Collection[str]) -> Mapping[str, int]:
        out = {}
        for sid in session_ids:
            raw = await self.log.redis.hget(  # type: ignore[misc]
                self.log.keys.applied(self.name, self.log.keys.shard_of(sid)), sid)
            out[sid] = int(raw or 0)
        return out

    async def apply(self, runs: Sequence[Run]) -> Collection[str]:
        script = self.log.redis.register_script(_APPLY_LUA)
        conflicts = []
        for run in runs:
            shard = self.log.keys.shard_of(run.session_id)
            res = await script(
                keys=[self.log.keys.applied(self.name, shard), self.list_key(shard)],
                args=[run.session_id, run.after, run.last, *(e.seq for e in run.envelopes)],
            )
            if int(res) != -1:
                conflicts.append(run.session_id)
        return conflicts

    async def applications(self) -> list[tuple[str, int]]:
        out = []
        for shard in self.log.keys.all_shards():
            for item in await self.log.redis.lrange(self.list_key(shard), 0, -1):  # type: ignore[misc]
                sid, seq = item.decode().split()
                out.append((sid, int(seq)))
        return out


def assert_applied_once_in_order(apps: list[tuple[str, int]], last: dict[str, int]) -> None:
    per: dict[str, list[int]] = {}
    for sid, seq in apps:
        per.setdefault(sid, []).append(seq)
    assert per == {sid: list(range(1, top + 1)) for sid, top in last.items()}


class TcpProxy:
    """A TCP proxy the test controls: ``cut()`` drops every connection and refuses new ones
    (as an unreachable database does), ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._scope: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> TcpProxy:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self.restore()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._tg is not None
        await self._tg.__aexit__(None, None, None)

    async def restore(self) -> None:
        assert self._tg is not None
        self.port = await self._tg.start(self._serve)

    def cut(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def _serve(self, *, task_status: TaskStatus[int]) -> None:
        with anyio.CancelScope() as self._scope:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                       local_port=self.port)
            async with listener:
                task_status.started(listener.extra(SocketAttribute.local_port))

                async def pipe(a: SocketStream, b: SocketStream) -> None:
                    try:
                        async for chunk in a:
                            await b.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    finally:
                        await b.aclose()

                async def handle(client: SocketStream) -> None:
                    try:
                        upstream = await anyio.connect_tcp(*self.target)
                    except OSError:
                        await client.aclose()
                        return
                    async with client, upstream, anyio.create_task_group() as conn:
                        conn.start_soon(pipe, client, upstream)
                        conn.start_soon(pipe, upstream, client)

                await listener.serve(handle)
