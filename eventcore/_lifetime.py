"""One lifetime style for the long-running parts (worker, subscriber runner, retention):
``async with part:`` starts ``part.run`` in an anyio task group and returns once it reported
ready (``await tg.start(...)``); leaving the block calls ``part.aclose()`` and then waits for
the task group."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any, Self

import anyio

from .errors import UsageError

__all__ = ["Running"]


class Running:
    """Mixin: an async context manager around ``run(task_status=...)`` and ``aclose()``."""

    _lifetime: contextlib.AsyncExitStack | None = None

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        if self._lifetime is not None:
            raise UsageError(f"this {type(self).__name__} is already entered")
        async with contextlib.AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            # LIFO: aclose() asks run() to end before the task group waits for it
            stack.push_async_callback(self.aclose)
            await tg.start(self.run)
            self._lifetime = stack.pop_all()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._lifetime = self._lifetime, None
        if stack is None:
            return None
        return await stack.__aexit__(et, e, tb)
