"""The memory sink: the documented test double."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from eventcore import Envelope
from eventcore.errors import UsageError

from ._base import Published

__all__ = ["MemorySink"]


class MemorySink:
    """Keeps everything it is sent, in order, and lets a test wait for it or make it fail.

    - ``published`` / ``envelopes``: what arrived (duplicates included, as a real sink would
      see them); :meth:`by_session` groups envelopes per session with duplicates removed.
    - ``await sink.wait_for(n)``: returns once ``n`` envelopes have arrived (no polling).
    - ``sink.fail(exc, times=2)``: the next two ``send`` calls raise ``exc`` (nothing is kept).
    - ``delay``: seconds each ``send`` takes, to play a slow sink.
    """

    def __init__(self, *, delay: float = 0.0) -> None:
        self.published: list[Published] = []
        self.sends = 0
        self.failures = 0
        self.closed = False
        self.delay = delay
        self._fail: list[BaseException] = []
        self._changed = anyio.Event()

    @property
    def envelopes(self) -> list[Envelope]:
        return [p.envelope for p in self.published]

    def by_session(self) -> dict[str, list[Envelope]]:
        out: dict[str, dict[int, Envelope]] = {}
        for p in self.published:
            out.setdefault(p.session_id, {}).setdefault(p.seq, p.envelope)
        return {sid: [seqs[k] for k in sorted(seqs)] for sid, seqs in out.items()}

    def fail(self, exc: BaseException, times: int = 1) -> None:
        self._fail += [exc] * times

    async def send(self, envelopes: Sequence[Published]) -> None:
        if self.closed:
            raise UsageError("MemorySink is closed")
        self.sends += 1
        if self.delay:
            await anyio.sleep(self.delay)
        if self._fail:
            self.failures += 1
            raise self._fail.pop(0)
        self.published += envelopes
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> list[Published]:
        """Wait until at least ``count`` envelopes have arrived; return them all. (Bound the
        wait with ``anyio.fail_after``.)"""
        while len(self.published) < count:
            await self._changed.wait()
        return list(self.published)

    async def aclose(self) -> None:
        self.closed = True
