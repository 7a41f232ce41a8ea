"""The worker's Lua scripts, and a coalescer that sends concurrent per-session calls of one
script as one call per shard.

Each script takes a few shard-level keys and args, then a fixed number of keys and args per
item (session), and returns one result per item. Sessions end, idle out and retry at arbitrary
moments; coalescing them per event-loop tick keeps that at one round trip per shard however
many sessions a worker hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from eventcore._coalesce import ShardCoalescer
from eventcore._redis import Redis, redis_errors, run_script

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["GROUP", "Coalescer", "load_script"]

GROUP = "workers"


def load_script(name: str) -> str:
    return resources.files("eventcore.workers").joinpath(f"_lua/{name}.lua").read_text()


Head = Callable[[int], tuple[list[str], list[Any]]]
Item = tuple[Sequence[str], Sequence[Any]]


class Coalescer:
    """``await call(shard, keys, args)`` -> this item's result; items queued in one tick for the
    same shard go out together (at most ``max_batch`` per call)."""

    def __init__(self, redis: Redis, script: str, head: Head, *, max_batch: int = 256) -> None:
        self._script: AsyncScript = redis.register_script(script)
        self._head = head
        self._max_batch = max_batch
        self._commit: ShardCoalescer[Item, Any] = ShardCoalescer(self._send,
                                                                  max_batch=max_batch)

    async def call(self, shard: int, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._commit.submit(shard, (keys, args))

    async def run_batch(self, shard: int, items: Sequence[Item]) -> list[Any]:
        """Send ``items`` directly (chunked), bypassing the tick queue."""
        out: list[Any] = []
        for start in range(0, len(items), self._max_batch):
            out += await self._send(shard, items[start:start + self._max_batch])
        return out

    async def _send(self, shard: int, items: Sequence[Item]) -> list[Any]:
        keys, args = self._head(shard)
        keys, args = list(keys), list(args)
        for k, a in items:
            keys += k
            args += a
        with redis_errors("worker script"):
            result: list[Any] = await run_script(self._script, keys, args)
        return result
