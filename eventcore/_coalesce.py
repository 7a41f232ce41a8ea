"""Group commit per shard: calls queued in one event-loop tick go to Redis as one round trip.

Used by the core appender and the worker's scripts. No background task: the first caller of a
shard becomes its *leader*. It waits one tick, so that the calls of that tick queue behind it,
sends up to ``max_batch`` of them in one round trip and answers each; meanwhile new calls queue
for the next round trip. It then hands the lead to the oldest call still waiting (whose caller
sends the next batch, its own among them) and returns its own answer. One round trip in flight
per shard keeps each shard's calls in order.

The round trip runs in a task group of the leader's, shielded from cancellation: a leader
cancelled mid-flight still finishes the batch (its batch mates are waiting for their answers)
and only then raises. A waiting caller that is cancelled is dropped from the queue if its call
has not been sent yet.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar, cast

import anyio

__all__ = ["ShardCoalescer"]

I = TypeVar("I")  # noqa: E741 - the conventional name of an item type
R = TypeVar("R")

Send = Callable[[int, list[I]], Awaitable[Sequence[R | BaseException]]]

_LEAD = object()  # a waiting call's answer meaning "you send the next batch"


class _Call(Generic[I]):
    __slots__ = ("answer", "item")

    def __init__(self, item: I, answer: asyncio.Future[object]) -> None:
        self.item = item
        self.answer = answer


class ShardCoalescer(Generic[I, R]):
    """``await submit(shard, item)`` -> that item's result. ``send(shard, items)`` answers one
    result per item, in order; an exception in its answer is raised to that item's caller
    only, an exception raised by ``send`` to every caller of the batch."""

    def __init__(self, send: Send[I, R], *, max_batch: int) -> None:
        self._send = send
        self._max_batch = max_batch
        self._queues: dict[int, deque[_Call[I]]] = {}
        self._leading: set[int] = set()
        self._idle: asyncio.Event | None = None

    async def submit(self, shard: int, item: I) -> R:
        loop = asyncio.get_running_loop()
        call = _Call(item, loop.create_future())
        queue = self._queues.get(shard)
        if queue is None:
            queue = self._queues[shard] = deque()
        queue.append(call)
        if shard not in self._leading:
            self._leading.add(shard)
            return await self._lead(shard, call)
        try:
            answer = await call.answer
        except asyncio.CancelledError:
            if not _promoted(call):
                raise
            # handed the lead as this caller was cancelled: send the batch anyway, then raise
            call.answer = loop.create_future()
            await self._lead(shard, call)
            raise
        if answer is _LEAD:
            call.answer = loop.create_future()
            return await self._lead(shard, call)
        return cast("R", answer)

    async def aclose(self) -> None:
        """Wait for the batches in flight and queued to be sent (their callers are waiting)."""
        while self._leading:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()

    async def _lead(self, shard: int, call: _Call[I]) -> R:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._flush, shard)
        return cast("R", call.answer.result())

    async def _flush(self, shard: int) -> None:
        queue = self._queues[shard]
        with anyio.CancelScope(shield=True):
            try:
                await asyncio.sleep(0)  # the calls of this tick join the batch
                batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
                await self._send_batch(shard, batch)
            finally:
                self._hand_over(shard, queue)

    async def _send_batch(self, shard: int, batch: list[_Call[I]]) -> None:
        try:
            results = await self._send(shard, [call.item for call in batch])
        except BaseException as exc:
            for call in batch:
                if not call.answer.done():
                    call.answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for call, res in zip(batch, results, strict=True):
            if call.answer.done():
                continue
            if isinstance(res, BaseException):
                call.answer.set_exception(res)
            else:
                call.answer.set_result(res)

    def _hand_over(self, shard: int, queue: deque[_Call[I]]) -> None:
        while queue:
            nxt = queue[0]
            if nxt.answer.done():  # its caller was cancelled before its call was sent
                queue.popleft()
                continue
            nxt.answer.set_result(_LEAD)
            return
        self._leading.discard(shard)
        if not self._leading and self._idle is not None:
            self._idle.set()
            self._idle = None


def _promoted(call: _Call[I]) -> bool:
    answer = call.answer
    return answer.done() and not answer.cancelled() and answer.result() is _LEAD
