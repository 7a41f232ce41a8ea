"""In-order, exactly-once application per session on top of at-least-once deliveries."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from eventcore import CorruptEntry, Envelope, EventLog
from eventcore._layout import SESSION_DELETED
from eventcore.errors import ApplyConflict, UsageError

from ._delivery import Delivery

__all__ = ["DELETED", "ApplyConflict", "OrderedStats", "OrderedSubscriber", "Position", "Run"]

log_ = logging.getLogger("eventcore.subscribers")


DELETED: Final = SESSION_DELETED
"""The type of the feed entry ``EventLog.delete_session`` writes for the deleted incarnation."""


class Position(NamedTuple):
    """Where a subscriber stands in a session: the last seq applied, of which incarnation of
    the session, and whether that incarnation was deleted (nothing more of it applies)."""

    seq: int
    incarnation: str = ""
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Run:
    """Envelopes to apply to one session: seqs ``after + 1 .. after + len(envelopes)``,
    contiguous and in order, of incarnation ``incarnation``. ``reset``: what is stored for the
    session belongs to an older incarnation (the id was deleted and created again): discard it
    in the same atomic step (``after`` is then 0)."""

    session_id: str
    after: int
    envelopes: tuple[Envelope, ...]
    incarnation: str = ""
    reset: bool = False

    @property
    def last(self) -> int:
        return self.after + len(self.envelopes)


@dataclass
class OrderedStats:
    applied: int = 0
    duplicates: int = 0
    gaps_filled: int = 0
    conflicts: int = 0
    gone: int = 0
    stale: int = 0
    deleted: int = 0


class OrderedSubscriber(ABC):
    """A subscriber that applies each session's envelopes in seq order, exactly once, whatever
    order (and however often) the feed delivers them.

    Subclasses keep a position per session (the last seq applied) stored atomically with what
    they apply, and implement:

    - :meth:`positions`: the stored :class:`Position` of each session (``Position(0)`` if
      none). A plain int is taken as a seq of whatever incarnation is delivered, for
      subscribers that do not tell incarnations apart;
    - :meth:`apply`: for each :class:`Run`, atomically, if the stored position is still
      ``run.after`` of ``run.incarnation`` (for a ``reset`` run: if what is stored is of an
      older incarnation), apply the envelopes and store ``run.last``; return the sessions where
      the position had moved (a concurrent consumer applied them first);
    - optionally :meth:`deleted`: purge what is stored of a deleted incarnation.

    Per batch: positions are read; envelopes at or below a session's position are duplicates
    and skipped; a hole between the position and the delivered seqs (entries delivered to
    another consumer, or not yet) is filled from the session stream with ``EventLog.read``
    (which continues from the archive where Redis has trimmed); conflicts are re-read and
    re-applied. A session deleted from Redis before its backlog was applied cannot be filled:
    its entries are dropped (counted in ``stats.gone``).

    Incarnations (a session id deleted, or expired, and created again is another session):
    incarnations of one id only grow, so entries of an incarnation older than the stored one,
    or than another in the same batch, or of a deleted one, are dropped (``stats.stale``); the
    first entries of a newer one start it over (``Run.reset``); and a ``session.deleted`` entry
    calls :meth:`deleted` (``stats.deleted``).
    """

    name: str = "ordered"
    max_conflict_rounds = 5

    def __init__(self, log: EventLog | None) -> None:
        self._log = log
        self.stats = OrderedStats()

    @property
    def log(self) -> EventLog:
        if self._log is None:
            raise UsageError(f"{type(self).__name__} was built without a log: it cannot "
                               "fill gaps, so it cannot run as a subscriber")
        return self._log

    @abstractmethod
    async def positions(self, session_ids: Collection[str]) -> Mapping[str, Position | int]: ...

    @abstractmethod
    async def apply(self, runs: Sequence[Run]) -> Collection[str]: ...

    async def deleted(self, session_id: str, incarnation: str) -> None:  # noqa: B027 (optional)
        """Incarnation ``incarnation`` of the session was deleted: purge what is stored of it
        (and of any older one), atomically, unless what is stored is of a newer incarnation.
        Nothing by default."""

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        if self._log is None:  # fail on the first batch, not on the first gap
            raise UsageError(f"{type(self).__name__} was built without a log: it cannot "
                               "run as a subscriber")
        # one pass: per session the newest incarnation delivered, its envelopes by seq (a
        # duplicate in the batch kept once), and whether it was deleted; everything of an
        # older incarnation is stale, also when a newer one comes later in the batch
        current: Mapping[str, str | None] | None = None
        newest: dict[str, str] = {}
        todo: dict[str, dict[int, Envelope]] = {}
        gone: set[str] = set()
        stale = 0
        for n, d in enumerate(deliveries):
            env = d.envelope
            sid = env.session_id
            inc = d.incarnation
            if not inc:  # the session's current incarnation (one query for the batch)
                if current is None:
                    current = await self._current(deliveries)
                inc = current.get(sid) or ""
            cur = newest.get(sid)
            if cur is None:
                newest[sid] = inc
            elif inc != cur:
                if inc < cur:  # superseded by a newer incarnation in this very batch
                    stale += 1
                    continue
                # supersedes what came before it in the batch (rare: counted again here)
                stale += sum(1 for e in deliveries[:n] if e.envelope.session_id == sid
                             and (e.incarnation or (current or {}).get(sid) or "") == cur)
                todo.pop(sid, None)
                gone.discard(sid)
                newest[sid] = inc
            if env.type == DELETED:
                gone.add(sid)
            else:
                envs = todo.get(sid)
                if envs is None:
                    todo[sid] = {env.seq: env}
                elif env.seq not in envs:
                    envs[env.seq] = env
        self.stats.stale += stale
        for sid in gone:
            self.stats.stale += len(todo.pop(sid, ()))
            self.stats.deleted += 1
            await self.deleted(sid, newest[sid])
        for _ in range(self.max_conflict_rounds):
            positions = await self.positions(list(todo))
            runs = []
            for sid, envs in todo.items():
                inc = newest[sid]
                raw = positions.get(sid)
                if raw is None:
                    pos = Position(0)  # nothing stored: any incarnation starts from scratch
                elif isinstance(raw, Position):
                    pos = raw
                else:  # a subscriber that does not tell incarnations apart
                    pos = Position(int(raw), inc)
                run = await self._run(sid, inc, pos, envs)
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

    async def _current(self, deliveries: Sequence[Delivery]) -> Mapping[str, str | None]:
        """The current incarnation of each session with a delivery that does not say which
        it belongs to (a legacy entry's session has none either)."""
        unknown = sorted({d.envelope.session_id for d in deliveries if not d.incarnation})
        return await self.log.incarnations(unknown)

    async def _run(self, sid: str, inc: str, pos: Position, envs: Mapping[int, Envelope]
                   ) -> Run | None:
        if inc < pos.incarnation or (inc == pos.incarnation and pos.deleted):
            self.stats.stale += len(envs)  # a deleted or superseded incarnation
            return None
        reset = inc != pos.incarnation
        position = 0 if reset else pos.seq
        seqs = sorted(envs)
        if seqs[0] <= position:  # duplicates of what is applied already
            seqs = [s for s in seqs if s > position]
            self.stats.duplicates += len(envs) - len(seqs)
            if not seqs:
                return None
        top = seqs[-1]
        if len(seqs) == top - position:  # contiguous from position + 1: nothing to fill
            return Run(sid, position, tuple(map(envs.__getitem__, seqs)), inc, reset)
        filled = await self._fill(sid, inc, position, top)
        if filled is None:
            self.stats.gone += len(seqs)
            log_.warning("subscriber %s: session %r is gone from Redis with seqs %d..%d "
                         "unapplied; dropping them", self.name, sid, position + 1, top)
            return None
        self.stats.gaps_filled += len(filled) - sum(1 for e in filled if e.seq in envs)
        return Run(sid, position, tuple(envs.get(e.seq, e) for e in filled), inc, reset)

    async def _fill(self, sid: str, inc: str, position: int, top: int
                    ) -> list[Envelope] | None:
        """Seqs ``position + 1 .. top`` of incarnation ``inc`` from the log; None if that
        incarnation no longer exists."""
        out: list[Envelope] = []
        after = position
        while after < top:
            page = await self.log.read(sid, after, min(1000, top - after))
            if not page:
                break
            out += (e for e in page if e.seq <= top)
            after = page[-1].seq
        # checked after the read: the stream and its metadata are deleted in one step, so the
        # stream read was of this incarnation if the metadata still names it
        if (await self.log.incarnations([sid]))[sid] != inc:
            return None
        if [e.seq for e in out] == list(range(position + 1, top + 1)):
            return out
        raise CorruptEntry(
            f"session {sid!r}: the log returned seqs {[e.seq for e in out][:10]}... "
            f"for {position + 1}..{top}"
        )
