"""Sinks made of sinks: fan-out to several, and a filter in front of one."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Sequence

import anyio

from ._base import Published, Sink

__all__ = ["FanoutSink", "FilterSink"]


class FanoutSink:
    """Sends every batch to all its sinks concurrently.

    Every sink gets the batch even when another fails; the failures are then raised together
    as an :class:`ExceptionGroup` (so ``except*`` can pick out a sink's error type)."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = tuple(sinks)

    async def send(self, envelopes: Sequence[Published]) -> None:
        if not envelopes:
            return
        errors: list[Exception] = []

        async def one(sink: Sink) -> None:
            try:
                await sink.send(envelopes)
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for sink in self.sinks:
                tg.start_soon(one, sink)
        if errors:
            raise ExceptionGroup(f"{len(errors)} of {len(self.sinks)} sinks failed", errors)

    async def aclose(self) -> None:
        errors: list[Exception] = []
        for sink in self.sinks:
            try:
                await sink.aclose()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise ExceptionGroup("closing sinks failed", errors)


class FilterSink:
    """Forwards only the envelopes that match, to one sink (nothing when none match).

    ``types`` are exact types or shell-style patterns (``"run.*"``); ``sessions`` are session
    ids; ``predicate`` sees each :class:`Published`. All given conditions must hold."""

    def __init__(
        self,
        sink: Sink,
        *,
        types: Collection[str] | None = None,
        sessions: Collection[str] | None = None,
        predicate: Callable[[Published], bool] | None = None,
    ) -> None:
        self.sink = sink
        self._exact = frozenset(t for t in types or () if not _is_pattern(t))
        self._patterns = tuple(t for t in types or () if _is_pattern(t))
        self._any_type = types is None
        self.sessions = frozenset(sessions) if sessions is not None else None
        self.predicate = predicate

    def matches(self, p: Published) -> bool:
        if not self._any_type and p.type not in self._exact and not any(
            fnmatch.fnmatchcase(p.type, pat) for pat in self._patterns
        ):
            return False
        if self.sessions is not None and p.session_id not in self.sessions:
            return False
        return self.predicate is None or self.predicate(p)

    async def send(self, envelopes: Sequence[Published]) -> None:
        chosen = [p for p in envelopes if self.matches(p)]
        if chosen:
            await self.sink.send(chosen)

    async def aclose(self) -> None:
        await self.sink.aclose()


def _is_pattern(t: str) -> bool:
    return any(c in t for c in "*?[")
