"""Group commit per shard: calls queued in one event-loop tick go to Redis as one round trip.

Used by the core appender and the worker's scripts. A flush started for a shard runs on the
next tick and sends everything queued so far; while that round trip is in flight, new items
queue for the next one. One flush in flight per shard keeps each shard's items in order. A
shard's flush loop is started once and then waits, idle, to be woken for the next batch
(starting a task per round trip cost more than the Python side of a 60-event batch).

The coalescer is an async context manager: its flushes run in its task group, so none outlives
it (leaving the block waits for the batches already queued). Each round trip is shielded from
cancellation: the callers of a batch are waiting for its answers, and a round trip cut off
halfway would leave them not knowing whether it was applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Generic, Self, TypeVar

import anyio
from anyio.abc import TaskGroup

from .errors import UsageError

__all__ = ["ShardCoalescer"]

_Future = asyncio.Future

I = TypeVar("I")  # noqa: E741 - the conventional name of an item type
R = TypeVar("R")

Send = Callable[[int, list[I]], Awaitable[Sequence[R | BaseException]]]


class ShardCoalescer(Generic[I, R]):
    """``await submit(shard, item)`` (or ``await enqueue(shard, item)``) -> that item's
    result. ``send(shard, items)`` answers one result per item, in order; an exception in its
    answer is raised to that item's caller only, an exception raised by ``send`` to every
    caller of the batch.

    Use inside ``async with coalescer:`` (entered and left in one task); ``submit`` may be
    called from any task meanwhile."""

    def __init__(self, send: Send[I, R], *, max_batch: int) -> None:
        self._send = send
        self._max_batch = max_batch
        # per shard: the queued items and, at the same positions, their callers' futures (two
        # lists: no pair to allocate, and to track for the garbage collector, per item)
        self._pending: dict[int, tuple[list[I], list[asyncio.Future[R]]]] = {}
        self._flushing: set[int] = set()
        # per shard whose flush loop is idle: the future that wakes it for the next batch (a
        # flush loop stays in the task group for the coalescer's lifetime: waking one costs a
        # fraction of starting a task, once per round trip)
        self._idle: dict[int, asyncio.Future[None]] = {}
        self._closing = False
        self._tg: TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise UsageError("this coalescer is already entered")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        # the loop, looked up once: asyncio.get_running_loop() calls getpid() on every call
        # (CPython 3.11), a syscall per queued item on the hot path
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        # the flushes already started send what is queued, then end; idle ones end now: the
        # task group waits for them
        self._closing = True
        idle, self._idle = self._idle, {}
        for wake in idle.values():
            if not wake.done():
                wake.set_result(None)
        return await tg.__aexit__(et, e, tb)

    async def submit(self, shard: int, item: I) -> R:
        return await self.enqueue(shard, item)

    def enqueue(self, shard: int, item: I) -> asyncio.Future[R]:
        """Queue ``item`` now; the future is its result (``submit`` without its coroutine:
        the hot path of a caller awaiting the future itself saves a frame per item).
        Cancelling the future drops the caller's interest, not the item once it is sent."""
        tg = self._tg
        if tg is None:
            raise UsageError("submit() outside the coalescer's lifetime (not started or closed)")
        loop = self._loop
        assert loop is not None
        # the C future itself: loop.create_future() is a Python frame more per item
        fut: asyncio.Future[R] = _Future(loop=loop)
        queue = self._pending.get(shard)
        if queue is None:
            queue = self._pending[shard] = ([], [])
        queue[0].append(item)
        queue[1].append(fut)
        if shard not in self._flushing:
            self._flushing.add(shard)
            wake = self._idle.pop(shard, None)
            if wake is None:
                tg.start_soon(self._drain, shard)
            else:
                wake.set_result(None)  # the shard's idle flush loop runs on the next tick
        return fut

    async def _drain(self, shard: int) -> None:
        items, futs = self._pending[shard]
        most = self._max_batch
        wake: asyncio.Future[None] | None = None
        try:
            while True:
                while items:
                    batch, waiting = items[:most], futs[:most]
                    del items[:most], futs[:most]
                    with anyio.CancelScope(shield=True):
                        try:
                            results = await self._send(shard, batch)
                        except BaseException as exc:
                            for fut in waiting:
                                if not fut.done():
                                    fut.set_exception(exc)
                            if not isinstance(exc, Exception):
                                raise
                            continue
                    for fut, res in zip(waiting, results, strict=True):
                        if fut.done():
                            continue
                        if isinstance(res, BaseException):
                            fut.set_exception(res)
                        else:
                            fut.set_result(res)
                self._flushing.discard(shard)
                if self._closing:
                    return
                assert self._loop is not None
                wake = self._idle[shard] = self._loop.create_future()
                # enqueue() wakes it (and marks the shard flushing again), __aexit__ to end
                # it. Shielded: a loop cancelled as it was woken would strand what was queued
                with anyio.CancelScope(shield=True):
                    await wake
        finally:
            self._flushing.discard(shard)
            if wake is not None and self._idle.get(shard) is wake:
                del self._idle[shard]
