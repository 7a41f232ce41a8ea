"""The consumer-group runtime over a set of shard streams (:mod:`eventcore._streams`): the one
implementation the worker pool (dispatch streams) and the subscribers (shard feeds) both use.

:class:`ConsumerGroup` is one group on those streams as seen by one consumer: ensure (BUSYGROUP
tolerated, at the checkpoint if one is known), NOGROUP recovery (recreated from the checkpoint,
never from ``$``), read (XREADGROUP over the :class:`~eventcore._streams.Span` of each node,
COUNT per shard: on a single node one blocking read; on Redis Cluster, where one command may
only name keys of one slot, one pipelined round trip per master node, and an idle read waits
for the shards' :class:`~eventcore._doorbell.Doorbell` instead of polling), ack, keep-alive, the
reclaim of idle entries (XAUTOCLAIM, optionally fenced by a lease, optionally with a delivery
limit whose entries go to the dead-letter stream in the same step), dead letters, group state,
checkpoints, and the trim below every group's floor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast, overload, runtime_checkable

import anyio
import redis.exceptions as rexc

from ._codec import encode, subscriber_dead_letter
from ._doorbell import Doorbell
from ._envelope import ErrorInfo
from ._keys import Keys
from ._redis import is_cluster, redis_errors, run_scripts
from ._redis import text as _s
from ._scripts import lua
from ._streams import GroupState, ShardStreams, Span, id_key, spans
from .errors import EventcoreError

__all__ = [
    "CheckpointStore",
    "Claimed",
    "ConsumerGroup",
    "Entry",
    "PairsEntry",
    "Reclaimed",
    "is_nogroup",
]

_TOUCH_CHUNK = 1000
#: Redis Cluster without a live doorbell: how long an idle read waits between polls (doubling
#: from the first to the last) while its blocking time lasts
CLUSTER_POLL_S = (0.005, 0.1)


def _script(name: str) -> str:
    # reclaim writes dead letters: it gets the prelude's one writer of that record
    return lua("eventcore", f"group_{name}", with_prelude=name == "reclaim", with_layout=True)


def is_nogroup(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was converted from) says the consumer group is gone."""
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, rexc.ResponseError) and "NOGROUP" in str(cur):
            return True
        cur = cur.__cause__
    return False


#: one entry read or reclaimed: (shard, entry id, fields)
Entry = tuple[int, str, dict[bytes, bytes]]
#: one entry read with ``pairs``: its fields as a dict, or as Redis sent them, a flat list
#: ``[field, value, ...]`` (:func:`~eventcore._codec.fields_of` makes the dict)
PairsEntry = tuple[int, str, dict[bytes, bytes] | list[bytes]]


@runtime_checkable
class CheckpointStore(Protocol):
    """Somewhere outside Redis to keep each group's checkpoint per shard (the entry id below
    which everything was acknowledged), so a group lost with Redis's data is recreated from
    there rather than from ``$``."""

    async def load_checkpoint(self, group: str, shard: int) -> str | None: ...

    async def save_checkpoint(self, group: str, shard: int, entry_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Claimed:
    """An entry a reclaim took over: its id, how often it has been delivered (this time
    included) and its fields."""

    entry_id: str
    deliveries: int
    fields: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """One reclaim step on one shard: whether it held the reclaim lease (always, unfenced),
    where the next step continues (``"0-0"``: the pending list was gone through), what it took
    and how many entries it dead-lettered instead."""

    held: bool
    cursor: str
    claimed: tuple[Claimed, ...] = ()
    dead: int = 0


class ConsumerGroup:
    """Consumer group ``group`` on ``streams``, as seen by consumer ``consumer``.

    ``start_id``: where a group with no checkpoint starts (never ``$``). ``store``: an external
    checkpoint store beside the one in Redis. ``on_recovered(shards)`` runs after a NOGROUP
    recovery recreated the group on those shards. ``kind`` tags this group's dead letters.

    ``channel(shard)``: the pub/sub channel published on when an entry is added to the shard's
    stream. On Redis Cluster, with ``doorbell``, it makes :attr:`doorbell` (None otherwise): an
    idle read then waits for it, polling every ``safety_poll_s`` anyway, once its listener
    runs (:meth:`Doorbell.listen`, or the caller's own listener passing it the events)."""

    def __init__(
        self, streams: ShardStreams, keys: Keys, group: str, consumer: str, *,
        start_id: str = "0", store: CheckpointStore | None = None, kind: str = "subscriber",
        on_recovered: Callable[[list[int]], Awaitable[None]] | None = None,
        channel: Callable[[int], str] | None = None, doorbell: bool = True,
        safety_poll_s: float = 1.0,
    ) -> None:
        self.streams = streams
        self.redis = streams.redis
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.start_id = start_id
        self.store = store
        self.kind = kind
        self.on_recovered = on_recovered
        self.shards = streams.shards
        #: the checkpoints this process knows: raised by :meth:`save_checkpoints` and :meth:`trim`
        self.checkpoints: dict[int, str] = {}
        # one save at a time: a second caller returns only once what the first raised is saved
        self._saving = anyio.Lock()
        self.recoveries = 0
        self.cluster = is_cluster(self.redis)
        self.doorbell = (Doorbell(self.redis, {s: channel(s) for s in self.shards})
                         if self.cluster and doorbell and channel is not None and self.shards
                         else None)
        self.safety_poll_s = safety_poll_s
        #: Redis Cluster: poll round trips made (one pipeline per master each), for metrics
        self.polls = 0
        #: Redis Cluster: XREADGROUPs those polls sent (one per stream looked at)
        self.looks = 0
        # (span streams, doorbell rings, clock) of the last read that found nothing new
        self._quiet: tuple[tuple[str, ...], int, float] | None = None
        redis = self.redis
        self._reclaim = redis.register_script(_script("reclaim"))
        self._touch = redis.register_script(_script("touch"))
        self._raise_checkpoint = redis.register_script(_script("checkpoint"))
        self._release = redis.register_script(_script("release"))

    @property
    def spans(self) -> tuple[Span, ...]:
        """The shards per node as the slot map says now (one span on a single node)."""
        return spans(self.shards, self.streams.stream, self.redis)

    @property
    def span(self) -> Span:
        """Every shard, as one span (a single node reads it in one blocking XREADGROUP)."""
        return Span(tuple(self.shards), tuple(self.stream(s) for s in self.shards))

    def share(self, total: int) -> int:
        """XREADGROUP's COUNT is per stream: each shard's share of ``total`` (at least 1)."""
        return self.span.share(total)

    def stream(self, shard: int) -> str:
        return self.streams.stream(shard)

    # -- the group's existence -------------------------------------------------------------------
    async def checkpoint_of(self, shard: int) -> str | None:
        """The highest checkpoint known: this process's, Redis's, the external store's."""
        found = [self.checkpoints.get(shard)]
        with redis_errors("checkpoint"):
            raw = await self.redis.get(self.keys.checkpoint(self.group, shard))
        found.append(_s(raw) if raw is not None else None)
        if self.store is not None:
            found.append(await self.store.load_checkpoint(self.group, shard))
        known = [c for c in found if c]
        return max(known, key=id_key) if known else None

    async def ensure(self, shards: Iterable[int] | None = None) -> list[int]:
        """Create the group on each stream where it is missing, at the shard's checkpoint if
        one is known, else at ``start_id``. Returns the shards where it was created."""
        created = []
        self._quiet = None  # a group created from a checkpoint has entries nobody rang for
        for shard in self.shards if shards is None else shards:
            start = await self.checkpoint_of(shard) or self.start_id
            try:
                with redis_errors("create group"):
                    await self.redis.xgroup_create(self.stream(shard), self.group, id=start,
                                                   mkstream=True)
                created.append(shard)
            except EventcoreError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return created

    async def recover(self) -> list[int]:
        """The group was gone (NOGROUP: Redis lost it, or someone destroyed it): recreate it
        where missing, from the checkpoint."""
        created = await self.ensure()
        self.recoveries += 1
        if self.on_recovered is not None:
            await self.on_recovered(created)
        return created

    async def recovered(self, exc: BaseException) -> bool:
        """If ``exc`` says the group is gone (NOGROUP, from any call of this group): recover
        and return True (the call is to be retried), else False."""
        if not is_nogroup(exc):
            return False
        await self.recover()
        return True

    # -- reading and acknowledging ---------------------------------------------------------------
    @overload
    async def read(self, count: int, block_ms: int | None, span: Span | None = None, *,
                   pairs: Literal[False] = False) -> list[Entry]: ...

    @overload
    async def read(self, count: int, block_ms: int | None, span: Span | None = None, *,
                   pairs: Literal[True]) -> list[PairsEntry]: ...

    async def read(self, count: int, block_ms: int | None, span: Span | None = None, *,
                   pairs: bool = False) -> list[Entry] | list[PairsEntry]:
        """XREADGROUP of new entries over ``span`` (default: every shard), up to ``count``
        per shard, blocking up to ``block_ms`` (None: not at all). A lost group raises (see
        :meth:`recovered`).

        On Redis Cluster a command names keys of one slot only (CROSSSLOT otherwise, even on
        one node), so a blocking read would hold a connection per shard: instead each poll is
        one round trip per master node, a pipeline of non-blocking XREADGROUPs of the shards
        it serves (redis-py splits it by the current slot map and follows MOVED and ASK;
        within the retry budget it re-reads the map). An idle read then waits for the
        :attr:`doorbell` and polls again the shards it was rung for (the notification of a
        new entry names its shard; every subscription and every lost connection of its
        listener rings for all of them), or all of them ``safety_poll_s`` after they were last
        polled; a read that follows an empty one polls only what was rung since (or all, once
        ``safety_poll_s`` passed). Without a live doorbell it polls again after a pause
        growing from 5 to 100 ms; until ``block_ms`` is spent. The connections stay one per
        node however many shards there are.

        ``pairs``: on a single node, each entry's fields as the flat list Redis sent (the
        reply is not parsed into a dict per entry: the subscribers' hot path reads a few
        fields of each); on Redis Cluster as dicts still."""
        if self.cluster:
            return await self._poll_nodes(count, block_ms, span or self.span)
        span = span or self.span
        if pairs:
            return await self._read_pairs(count, block_ms, span)
        with redis_errors("xreadgroup"):
            got = await self.redis.xreadgroup(
                self.group, self.consumer, dict.fromkeys(span.streams, ">"), count=count,
                block=block_ms)
        out: list[Entry] = []
        for name, items in got or ():  # the shard once per stream, not once per entry
            shard = span.shard_of(_s(name))
            out += [(shard, _s(eid), fields) for eid, fields in items]
        return out

    async def _read_pairs(self, count: int, block_ms: int | None, span: Span
                          ) -> list[PairsEntry]:
        args: list[object] = ["COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        # named as two words, which redis-py packs as such and has no reply parser for:
        # the reply comes as Redis sent it (stream name, [[entry id, [field, value, ...]]])
        with redis_errors("xreadgroup"):
            got = await cast("Any", self.redis).execute_command(
                "XREADGROUP GROUP", self.group, self.consumer, *args, "STREAMS",
                *span.streams, *(">",) * len(span.streams))
        if isinstance(got, dict):  # RESP3: a map of stream name -> entries
            got = got.items()
        out: list[PairsEntry] = []
        for name, items in got or ():
            shard = span.shard_of(_s(name))
            out += [(shard, _s(eid), fields) for eid, fields in items]
        return out

    async def _poll_nodes(self, count: int, block_ms: int | None, span: Span) -> list[Entry]:
        bell = self.doorbell
        if bell is None:
            return await self._fast_poll(count, block_ms, span)
        clock = anyio.current_time
        now = clock()
        deadline = now + (block_ms or 0) / 1000
        # what the last empty read of this span left: nothing new up to ring `seen`, every
        # shard looked at `full_at`; forgotten until this read ends empty too
        quiet, self._quiet = self._quiet, None
        polling: Span | None = span
        seen, full_at = bell.rings, now
        if quiet is not None and quiet[0] == span.streams and block_ms and bell.live:
            seen, full_at = quiet[1], quiet[2]
            polling = self._due(bell, span, seen, full_at)
            if polling is None:
                seen = bell.rings
        while True:
            if polling is not None:
                if polling is span:
                    full_at = clock()
                # taken before looking: a ring while the poll is under way is not waited for
                mark = bell.rings
                out = await self._poll(count, polling)
                if out:
                    return out
                seen = mark
            left = deadline - clock()
            if not block_ms or left <= 0:
                if bell.live:
                    self._quiet = (span.streams, seen, full_at)
                return []
            if not bell.live:  # not listening (yet, or again): nothing would ring
                return await self._fast_poll(count, int(left * 1000) + 1, span,
                                             looked=polling is span)
            await bell.wait(seen, min(full_at + self.safety_poll_s - clock(), left))
            polling = self._due(bell, span, seen, full_at)
            if polling is None:
                seen = bell.rings  # rings of nothing in this span

    def _due(self, bell: Doorbell, span: Span, seen: int, full_at: float) -> Span | None:
        """What to poll after ring ``seen``: the shards rung since (every one after a
        subscription or a loss, or once ``safety_poll_s`` passed since ``full_at``), None
        for nothing."""
        rang = bell.since(seen)
        if rang is None or anyio.current_time() - full_at >= self.safety_poll_s:
            return span
        if not rang:
            return None
        part = [(shard, name) for shard, name in zip(span.shards, span.streams, strict=True)
                if shard in rang]
        if not part:
            return None
        if len(part) == len(span.shards):
            return span
        return Span(tuple(p[0] for p in part), tuple(p[1] for p in part), span.node)

    async def _poll(self, count: int, span: Span) -> list[Entry]:
        """One look at every stream of ``span``: a pipeline of non-blocking XREADGROUPs
        (redis-py sends one round trip per master node)."""
        self.polls += 1
        self.looks += len(span.streams)
        with redis_errors("xreadgroup"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in span.streams:
                    pipe.xreadgroup(self.group, self.consumer, {name: ">"}, count=count)
                replies = await pipe.execute()
        return [(shard, _s(eid), fields)
                for shard, got in zip(span.shards, replies, strict=True)
                for _, items in got or () for eid, fields in items]

    async def _fast_poll(self, count: int, block_ms: int | None, span: Span, *,
                         looked: bool = False) -> list[Entry]:
        """Without a live doorbell: poll again after 5 ms, doubling up to 100 ms, until
        ``block_ms`` is spent (``looked``: the span was just polled, wait first)."""
        deadline = anyio.current_time() + (block_ms or 0) / 1000
        pause, most = CLUSTER_POLL_S
        out: list[Entry] = []
        while True:
            if not looked:
                out = await self._poll(count, span)
            looked = False
            left = deadline - anyio.current_time()
            if out or not block_ms or left <= 0:
                return out
            await anyio.sleep(min(pause, left))
            pause = min(pause * 2, most)

    async def ack(self, ids: Mapping[int, Sequence[str]]) -> None:
        if not any(ids.values()):
            return
        with redis_errors("ack"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, entry_ids in ids.items():
                    if entry_ids:
                        pipe.xack(self.stream(shard), self.group, *entry_ids)
                await pipe.execute()

    async def touch(self, ids: Mapping[int, Sequence[str]], *, uncount: bool = False) -> int:
        """Keep entries this consumer still owns from looking idle to a reclaim (XCLAIM JUSTID
        to itself); ``uncount``: also take back one delivery of each (a reclaim took them, but
        they are alive here). Returns how many it kept."""
        kept = 0
        with redis_errors("touch"):
            for shard, entry_ids in ids.items():
                for i in range(0, len(entry_ids), _TOUCH_CHUNK):
                    chunk = list(entry_ids[i : i + _TOUCH_CHUNK])
                    kept += int(await self._touch(
                        keys=[self.stream(shard)],
                        args=[self.group, self.consumer, "1" if uncount else "0", *chunk]))
        return kept

    # -- reclaiming idle entries ---------------------------------------------------------------
    async def reclaim(
        self, shard: int, *, cursor: str, min_idle_ms: int, count: int, lease_ms: int = 0,
        max_deliveries: int = 0,
    ) -> Reclaimed:
        """One XAUTOCLAIM step on ``shard`` from ``cursor``: entries idle for ``min_idle_ms``
        become this consumer's. ``lease_ms`` > 0 fences it by the (group, shard) reclaim lease
        (held that long; another holder's lease means nothing is claimed). ``max_deliveries``
        > 0: entries delivered more often go to the dead-letter stream instead (0: the caller
        judges :attr:`Claimed.deliveries` itself)."""
        error = encode(ErrorInfo(
            type="DeliveryLimit", retryable=False,
            message=f"delivered more than {max_deliveries} times without an acknowledgement "
                    "(its consumers died or timed out)",
        )) if max_deliveries > 0 else b""
        with redis_errors("reclaim"):
            res = await self._reclaim(
                keys=[self.keys.reclaim_lock(self.group, shard), self.stream(shard),
                      self.keys.dead(shard)],
                args=[self.consumer, lease_ms, self.group, min_idle_ms, cursor, count,
                      max_deliveries, error, self.kind])
        if int(res[0]) == 0:
            return Reclaimed(False, cursor)
        claimed = []
        for entry_id, n, flat in res[2]:
            fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
            claimed.append(Claimed(_s(entry_id), int(n), fields))
        return Reclaimed(True, _s(res[1]), tuple(claimed), int(res[3]))

    async def release_leases(self) -> None:
        """Give up the reclaim leases this consumer holds (they would expire anyway)."""
        with redis_errors("release lease"):
            await run_scripts(self.redis, self._release, [
                ([self.keys.reclaim_lock(self.group, shard)], [self.consumer])
                for shard in self.shards])

    async def dead_letter(
        self, shard: int, entry_id: str, fields: Mapping[bytes, bytes], deliveries: int,
        error: ErrorInfo,
    ) -> None:
        """Move one entry to the shard's dead-letter stream with the error, and ack it, in one
        transaction (both keys are in the shard's slot); the record is the one the reclaim
        script writes for entries past the delivery limit."""
        record = subscriber_dead_letter(
            group=self.group, consumer=self.consumer, feed=self.stream(shard),
            entry_id=entry_id, deliveries=deliveries, error=error, fields=fields, kind=self.kind)
        with redis_errors("dead-letter"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.keys.dead(shard), record)  # type: ignore[arg-type]
                pipe.xack(self.stream(shard), self.group, entry_id)
                await pipe.execute()

    # -- state, checkpoints, trimming ----------------------------------------------------------
    async def state(self) -> list[GroupState]:
        """Each shard's state of this group, lag included (``exists=False`` where it is
        missing)."""
        groups = await self.streams.groups(lag_of=self.group)
        return [groups[shard].get(self.group, GroupState(shard, exists=False))
                for shard in self.shards]

    def _raise(self, shard: int, entry_id: str) -> bool:
        old = self.checkpoints.get(shard)
        if old is not None and id_key(old) >= id_key(entry_id):
            return False
        self.checkpoints[shard] = entry_id
        return True

    async def save_checkpoints(self, states: Sequence[GroupState]) -> None:
        """Raise each shard's checkpoint to what the group has acknowledged: in this process,
        in Redis, and in the external store if there is one."""
        async with self._saving:
            moved = [st.shard for st in states
                     if st.exists and self._raise(st.shard, st.safe_id)]
            if not moved:
                return
            with redis_errors("checkpoint"):
                # raising a checkpoint twice is harmless: the batch may be sent again
                await run_scripts(self.redis, self._raise_checkpoint, [
                    ([self.keys.checkpoint(self.group, shard)], [self.checkpoints[shard]])
                    for shard in moved])
            if self.store is not None:
                for shard in moved:
                    await self.store.save_checkpoint(self.group, shard,
                                                     self.checkpoints[shard])

    async def trim(self) -> dict[int, int | None]:
        """Trim the streams below what every group on them still needs (this one must exist
        there), and remember what this group has acknowledged as this process's checkpoints:
        a NOGROUP recovery starts there rather than at ``start_id``."""
        groups = await self.streams.groups()
        for named in groups.values():
            mine = named.get(self.group)
            if mine is not None:
                self._raise(mine.shard, mine.safe_id)
        return await self.streams.trim_at(self.streams.floors_of(groups, [self.group]))

    async def forget_idle_consumers(self, idle_ms: int) -> int:
        """Delete consumers with nothing pending that have been silent for ``idle_ms`` (each
        process start adds a consumer name; dead ones would otherwise pile up)."""
        removed = 0
        for shard in self.shards:
            stream = self.stream(shard)
            with redis_errors("consumers"):
                try:
                    consumers = await self.redis.xinfo_consumers(stream, self.group)
                except rexc.ResponseError:
                    continue
                for c in consumers:
                    name = _s(c.get("name"))
                    if (name != self.consumer and int(c.get("pending", 0)) == 0
                            and int(c.get("idle", 0)) > idle_ms):
                        await self.redis.xgroup_delconsumer(stream, self.group, name)
                        removed += 1
        return removed
