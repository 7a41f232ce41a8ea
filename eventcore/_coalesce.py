"""Group commit per shard: calls queued in one event-loop tick go to Redis as one round trip.

Used by the core appender and the worker's scripts. A flush task started for a shard runs on the
next tick and sends everything queued so far; while that round trip is in flight, new items
queue for the next one. One flush in flight per shard keeps each shard's items in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["ShardCoalescer"]

I = TypeVar("I")  # noqa: E741 - the conventional name of an item type
R = TypeVar("R")

Send = Callable[[int, list[I]], Awaitable[Sequence[R | BaseException]]]


class ShardCoalescer(Generic[I, R]):
    """``await submit(shard, item)`` -> that item's result. ``send(shard, items)`` answers one
    result per item, in order; an exception in its answer is raised to that item's caller
    only, an exception raised by ``send`` to every caller of the batch."""

    def __init__(self, send: Send[I, R], *, max_batch: int) -> None:
        self._send = send
        self._max_batch = max_batch
        self._pending: dict[int, list[tuple[I, asyncio.Future[R]]]] = {}
        self._flushing: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, shard: int, item: I) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        queue = self._pending.get(shard)
        if queue is None:
            queue = self._pending[shard] = []
        queue.append((item, fut))
        if shard not in self._flushing:
            self._flushing.add(shard)
            task = loop.create_task(self._drain(shard))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def aclose(self) -> None:
        """Wait for the batches already queued to be sent (their callers are waiting)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self, shard: int) -> None:
        queue = self._pending[shard]
        try:
            while queue:
                batch = queue[: self._max_batch]
                del queue[: self._max_batch]
                try:
                    results = await self._send(shard, [item for item, _ in batch])
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            self._flushing.discard(shard)
