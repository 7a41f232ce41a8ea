"""A task group for many short tasks, at a fraction of the cost of anyio's ``start_soon``.

anyio's ``TaskGroup.start_soon`` gives every task a task handle with a cancel scope and an
event of its own, a wrapper coroutine and an import executed per call: about 40 µs per task
more than a native asyncio task on the 2-core machine (benchmarks/dispatch.py: a worker starts
one task per hosted session, and this was a third of its CPU per session). A :class:`TaskSet`
starts each task as a native asyncio task (the caller's context copied, as for any task) that
runs inside an anyio cancel scope of its own, so cancelling the set is anyio's cancellation:
level-triggered, and shielded scopes inside the tasks still finish what they shield.

As with a task group: ``async with TaskSet() as tasks:`` leaves the block only once every task
has finished (the wait is shielded); leaving it by an exception or a cancellation cancels the
tasks first; an exception other than a cancellation escaping a task cancels the other tasks
and the block's body, and is raised from the block (in a ``BaseExceptionGroup``).
Use on asyncio only (the worker's backend).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

import anyio

from .errors import UsageError

__all__ = ["TaskSet"]


class TaskSet:
    __slots__ = ("_closed", "_errors", "_idle", "_loop", "_scope", "_stopping", "_tasks")

    def __init__(self) -> None:
        # each running task and the cancel scope it runs in (None until it has started)
        self._tasks: dict[asyncio.Task[None], anyio.CancelScope | None] = {}
        self._scope: anyio.CancelScope | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._errors: list[BaseException] = []
        self._idle: asyncio.Future[None] | None = None
        self._closed = False  # the block has ended: no task starts any more

    def __len__(self) -> int:
        return len(self._tasks)

    async def __aenter__(self) -> Self:
        if self._scope is not None or self._closed:
            raise UsageError("a task set is entered once")
        self._loop = asyncio.get_running_loop()
        # the body's scope: a failing task cancels the body too, as in a task group
        self._scope = anyio.CancelScope()
        self._scope.__enter__()
        return self

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Start ``fn(*args)`` as a task of the set (it runs from the next tick on)."""
        loop = self._loop
        if loop is None or self._closed:
            # (while the block waits for its tasks, as with a task group, one may still start)
            raise UsageError("start_soon() outside the task set's block")
        task = loop.create_task(self._run(fn, args))
        self._tasks[task] = None
        task.add_done_callback(self._done)

    def cancel(self) -> None:
        """Cancel every task (and any started from now on) and the block's body."""
        self._cancel_tasks()
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, fn: Callable[..., Coroutine[Any, Any, None]], args: tuple[Any, ...]
                   ) -> None:
        task = asyncio.current_task()
        assert task is not None
        with anyio.CancelScope() as scope:
            if self._stopping:
                scope.cancel()
            self._tasks[task] = scope
            await fn(*args)

    def _done(self, task: asyncio.Task[None]) -> None:
        del self._tasks[task]
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._errors.append(exc)
                self.cancel()
        idle = self._idle
        if not self._tasks and idle is not None and not idle.done():
            idle.set_result(None)

    def _cancel_tasks(self) -> None:
        self._stopping = True
        for scope in self._tasks.values():
            if scope is not None:
                scope.cancel()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        scope = self._scope
        assert scope is not None and self._loop is not None
        try:
            if et is not None:
                self._cancel_tasks()
            with anyio.CancelScope(shield=True):
                while self._tasks:
                    self._idle = self._loop.create_future()
                    await self._idle
        finally:
            self._idle = None
            self._closed = True
            self._scope = None
            swallowed = scope.__exit__(et, e, tb)
        if self._errors:
            errors = self._errors
            if e is not None and not isinstance(e, anyio.get_cancelled_exc_class()):
                errors = [*errors, e]
            raise BaseExceptionGroup("unhandled errors in a TaskSet", errors)
        return swallowed
