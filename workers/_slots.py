"""The worker's session slots: hosted sessions plus reservations never exceed its concurrency.

A path that is about to host sessions (the dispatch read, the backlog, reclaim) holds the slots
they need as a reservation for as long as the claim is in flight, so two paths never hand out
the same slot. Every change that can free a slot (a reservation released, a hosted session
ended) wakes whoever waits for one, in this one place: a path that took slots cannot forget
to wake the dispatch read when it gives them back (it once did, and the read slept until some
hosted session ended: at a few thousand waiting sessions, never).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import anyio

__all__ = ["Slots"]


class Slots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hosted = 0
        self.reserved = 0
        self._changed = anyio.Event()
        self._waiting = 0

    @property
    def free(self) -> int:
        return self.capacity - self.hosted - self.reserved

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        """Hold ``n`` free slots for the block (sessions hosted in it take slots of their own
        with :meth:`host`; the reservation is given back, and waiters woken, on leaving)."""
        if not 0 <= n <= self.free:
            raise ValueError(f"cannot reserve {n} slots: {self.free} free")
        self.reserved += n
        try:
            yield
        finally:
            self.reserved -= n
            self.wake()

    def host(self) -> None:
        """A session is hosted now (inside the reservation that was held for it)."""
        self.hosted += 1

    def release(self) -> None:
        """A hosted session ended: its slot is free."""
        self.hosted -= 1
        self.wake()

    def wake(self) -> None:
        """Waiters check their condition again (also for a reason of the caller's: drain).
        With nobody waiting there is nothing to wake (no new event per hosted session)."""
        if self._waiting:
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Return once ``done()`` holds, checked again after every change of the slots and
        every :meth:`wake`."""
        while not done():
            # (counted before waiting, with no await between the check and the wait: a wake
            # from now on sets the event waited on)
            self._waiting += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1
