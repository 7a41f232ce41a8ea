"""The publish path: the Redis log sink first, then the ``on_published`` hook and inline sinks."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Self

import anyio

from eventcore import Envelope, EventLog
from eventcore.errors import SinkFailed

from ._base import Published, Sink
from ._compose import FanoutSink
from ._redis import RedisLogSink

__all__ = ["OnPublished", "Publisher"]

OnPublished = Callable[[Published], Awaitable[None]]


class Publisher:
    """Publishes envelopes: the log assigns seq, then the hook and the inline sinks see them.

    What the caller sees:

    - the log refused or Redis failed: that error (:class:`~eventcore.SessionNotFound`,
      :class:`~eventcore.RedisUnavailable`, ...); envelopes before and after a refused one in
      the same batch may be committed, and publishing the batch again finishes it;
    - the log accepted everything, then ``on_published`` (called once per envelope, in order)
      or an inline sink raised or took longer than ``timeout_s``: :class:`~eventcore.SinkFailed`
      with ``published`` (every envelope with its seq) and the hook's or sink's error as
      ``__cause__``. The log is never rolled back or altered by a sink: the events happened.
      Publishing ``[p.envelope for p in exc.published]`` again is safe (the event keys make the
      log keep the first) and runs the hook and sinks again, with ``duplicate=True``.

    Envelopes without an event key get a random one before the append, so that retry works.
    """

    def __init__(
        self,
        log: EventLog | RedisLogSink,
        *,
        on_published: OnPublished | None = None,
        inline: Sequence[Sink] = (),
        timeout_s: float | None = 10.0,
    ) -> None:
        self.log_sink = log if isinstance(log, RedisLogSink) else RedisLogSink(log)
        self.on_published = on_published
        self.inline: Sink | None = (
            inline[0] if len(inline) == 1 else FanoutSink(*inline) if inline else None
        )
        self.timeout_s = math.inf if timeout_s is None else timeout_s

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def publish(
        self, envelopes: Sequence[Envelope], *, epoch: int | None = None
    ) -> list[Published]:
        published = await self.log_sink.publish(envelopes, epoch=epoch)
        if self.on_published is not None:
            try:
                with anyio.fail_after(self.timeout_s):
                    for p in published:
                        await self.on_published(p)
            except Exception as exc:
                raise SinkFailed("on_published hook", published, exc) from exc
        if self.inline is not None and published:
            try:
                with anyio.fail_after(self.timeout_s):
                    await self.inline.send(published)
            except Exception as exc:
                raise SinkFailed("inline sink", published, exc) from exc
        return published

    async def publish_one(self, envelope: Envelope, *, epoch: int | None = None) -> Published:
        (p,) = await self.publish([envelope], epoch=epoch)
        return p

    async def aclose(self) -> None:
        """Close the inline sinks (the log belongs to the caller)."""
        if self.inline is not None:
            await self.inline.aclose()
