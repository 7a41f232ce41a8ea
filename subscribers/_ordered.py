"""In-order, exactly-once application per session on top of at-least-once deliveries."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from eventcore import CorruptEntry, Envelope, EventLog, SessionNotFound

from ._delivery import Delivery

__all__ = ["ApplyConflict", "OrderedStats", "OrderedSubscriber", "Run"]

log_ = logging.getLogger("eventcore.subscribers")


@dataclass(frozen=True, slots=True)
class Run:
    """Envelopes to apply to one session: seqs ``after + 1 .. after + len(envelopes)``,
    contiguous and in order."""

    session_id: str
    after: int
    envelopes: tuple[Envelope, ...]

    @property
    def last(self) -> int:
        return self.after + len(self.envelopes)


class ApplyConflict(Exception):
    """Another consumer kept moving the same sessions; the entries are retried later."""


@dataclass
class OrderedStats:
    applied: int = 0
    duplicates: int = 0
    gaps_filled: int = 0
    conflicts: int = 0
    gone: int = 0


class OrderedSubscriber(ABC):
    """A subscriber that applies each session's envelopes in seq order, exactly once, whatever
    order (and however often) the feed delivers them.

    Subclasses keep a position per session (the last seq applied) stored atomically with what
    they apply, and implement:

    - :meth:`positions`: the stored position of each session (0 if none);
    - :meth:`apply`: for each :class:`Run`, atomically, if the stored position is still
      ``run.after``, apply the envelopes and store ``run.last``; return the sessions where the
      position had moved (a concurrent consumer applied them first).

    Per batch: positions are read; envelopes at or below a session's position are duplicates
    and skipped; a hole between the position and the delivered seqs (entries delivered to
    another consumer, or not yet) is filled from the session stream with ``EventLog.read``
    (which continues from the archive where Redis has trimmed); conflicts are re-read and
    re-applied. A session deleted from Redis before its backlog was applied cannot be filled:
    its entries are dropped (counted in ``stats.gone``).
    """

    name: str = "ordered"
    max_conflict_rounds = 5

    def __init__(self, log: EventLog | None) -> None:
        self._log = log
        self.stats = OrderedStats()

    @property
    def log(self) -> EventLog:
        if self._log is None:
            raise RuntimeError(f"{type(self).__name__} was built without a log: it cannot "
                               "fill gaps, so it cannot run as a subscriber")
        return self._log

    @abstractmethod
    async def positions(self, session_ids: Collection[str]) -> Mapping[str, int]: ...

    @abstractmethod
    async def apply(self, runs: Sequence[Run]) -> Collection[str]: ...

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        if self._log is None:  # fail on the first batch, not on the first gap
            raise RuntimeError(f"{type(self).__name__} was built without a log: it cannot "
                               "run as a subscriber")
        by_session: dict[str, dict[int, Envelope]] = {}
        for d in deliveries:
            by_session.setdefault(d.session_id, {}).setdefault(d.seq, d.envelope)
        todo = by_session
        for _ in range(self.max_conflict_rounds):
            positions = await self.positions(list(todo))
            runs = []
            for sid, envs in todo.items():
                run = await self._run(sid, positions.get(sid, 0), envs)
                if run is not None:
                    runs.append(run)
            if not runs:
                return
            conflicts = set(await self.apply(runs))
            for run in runs:
                if run.session_id not in conflicts:
                    self.stats.applied += len(run.envelopes)
            if not conflicts:
                return
            self.stats.conflicts += len(conflicts)
            todo = {sid: todo[sid] for sid in conflicts}
        raise ApplyConflict(f"sessions {sorted(todo)[:5]} kept moving; retrying later")

    async def _run(self, sid: str, position: int, envs: Mapping[int, Envelope]) -> Run | None:
        seqs = sorted(s for s in envs if s > position)
        self.stats.duplicates += len(envs) - len(seqs)
        if not seqs:
            return None
        top = seqs[-1]
        if len(seqs) == top - position:  # contiguous from position + 1: nothing to fill
            return Run(sid, position, tuple(envs[s] for s in seqs))
        filled = await self._fill(sid, position, top)
        if filled is None:
            self.stats.gone += len(seqs)
            log_.warning("subscriber %s: session %r is gone from Redis with seqs %d..%d "
                         "unapplied; dropping them", self.name, sid, position + 1, top)
            return None
        self.stats.gaps_filled += len(filled) - sum(1 for e in filled if e.seq in envs)
        return Run(sid, position, tuple(envs.get(e.seq, e) for e in filled))

    async def _fill(self, sid: str, position: int, top: int) -> list[Envelope] | None:
        """Seqs ``position + 1 .. top`` from the log; None if the session no longer exists."""
        out: list[Envelope] = []
        after = position
        while after < top:
            page = await self.log.read(sid, after, min(1000, top - after))
            if not page:
                break
            out += (e for e in page if e.seq <= top)
            after = page[-1].seq
        if [e.seq for e in out] == list(range(position + 1, top + 1)):
            return out
        try:
            await self.log.get_session(sid)
        except SessionNotFound:
            return None
        raise CorruptEntry(
            f"session {sid!r}: the log returned seqs {[e.seq for e in out][:10]}... "
            f"for {position + 1}..{top}"
        )
