"""Shard streams and their entry ids, whatever consumer groups read them.

- :func:`id_key` / :func:`id_pred`: the ordering of entry ids, and the id just below one.
- :class:`Span`: which shards one read covers. On a single Redis node one blocking read
  covers every shard; on Redis Cluster there is one span per master node, the shards whose
  slots it serves now (:func:`spans` is the one place that decides, from the client's slot
  map, so a moved slot or a failover re-groups them at the next read).
- :class:`ShardStreams`: every group's state on each stream, the trim floor (the oldest id any
  group still needs: its oldest pending entry, else its last delivered one) and the exact
  MINID trim below it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rexc

from ._redis import Redis, is_cluster, redis_errors
from ._redis import text as _s

__all__ = ["GroupState", "ShardStreams", "Span", "id_key", "id_pred", "spans"]

_MAX_U64 = 2**64 - 1


def _queue_xinfo(pipe: Any, stream: str) -> None:
    pipe.xinfo_groups(stream)


def _queue_xpending(pipe: Any, stream: str, group: str) -> None:
    pipe.xpending(stream, group)


def id_key(entry_id: str) -> tuple[int, int]:
    """The ordering key of a stream entry id (``"ms-seq"``; ``"ms"`` means ``"ms-0"``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_pred(entry_id: str) -> str:
    """The greatest stream id below ``entry_id``."""
    ms, seq = id_key(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_MAX_U64}" if ms > 0 else "0-0"


@dataclass(frozen=True, slots=True)
class Span:
    """The shards one read covers, and their stream names (in the same order); ``node``: the
    master serving them (``host:port``) on Redis Cluster, None on a single node."""

    shards: tuple[int, ...]
    streams: tuple[str, ...]
    node: str | None = None

    def shard_of(self, stream: str) -> int:
        return self.shards[self.streams.index(stream)]

    def share(self, total: int) -> int:
        """XREADGROUP's COUNT is per stream: each shard's share of ``total`` (at least 1)."""
        return max(1, -(-total // len(self.shards)))


def spans(shards: Sequence[int], stream: Callable[[int], str], redis: Redis | None = None
          ) -> tuple[Span, ...]:
    """How the shards are split between reads: one read for all of them on a single Redis
    node; on Redis Cluster (``redis`` a cluster client) one span per master node, the shards
    whose slots it serves by the client's current slot map (in the order of ``shards``)."""
    if redis is None or not is_cluster(redis):
        return (Span(tuple(shards), tuple(stream(s) for s in shards)),)
    nodes = redis.nodes_manager  # type: ignore[attr-defined]
    by_node: dict[str, list[tuple[int, str]]] = {}
    for shard in shards:
        name = stream(shard)
        try:
            node = nodes.get_node_from_slot(redis.keyslot(name)).name  # type: ignore[attr-defined]
        except Exception:  # the slot map is being re-read (failover): the read re-groups
            node = ""
        by_node.setdefault(node, []).append((shard, name))
    return tuple(Span(tuple(s for s, _ in items), tuple(n for _, n in items), node or None)
                 for node, items in by_node.items())


@dataclass(frozen=True, slots=True)
class GroupState:
    """One shard's view of the group: what a checkpoint or a trim may rely on."""

    shard: int
    exists: bool
    last_delivered: str = "0-0"
    pending: int = 0
    min_pending: str | None = None
    lag: int | None = None

    @property
    def safe_id(self) -> str:
        """Every entry at or below this id has been acknowledged by the group."""
        if self.min_pending is not None:
            return id_pred(self.min_pending)
        return self.last_delivered

    @property
    def floor(self) -> str:
        """The oldest entry the group still needs: its oldest pending one, else its last
        delivered one (acknowledged, but kept: the floor of a trim is an entry that exists)."""
        return self.min_pending if self.min_pending is not None else self.last_delivered


class ShardStreams:
    """A set of shard streams (``stream(shard)`` names each), whatever groups read them."""

    def __init__(self, redis: Redis, stream: Callable[[int], str], shards: Iterable[int]) -> None:
        self.redis = redis
        self.stream = stream
        self.shards = list(shards)

    async def groups(self, *, lag_of: str | None = None) -> dict[int, dict[str, GroupState]]:
        """Every group on each shard's stream (none where the stream does not exist), in two
        round trips for all shards; the lag of group ``lag_of`` too (counted by hand on Redis
        6.2)."""
        with redis_errors("group floors"):
            infos = await self._each([(_queue_xinfo, self.stream(shard)) for shard in self.shards])
            found: list[tuple[int, dict[str, Any]]] = []
            for shard, groups in zip(self.shards, infos, strict=True):
                if isinstance(groups, Exception):
                    if "no such key" in str(groups).lower():
                        continue
                    raise groups
                found += [(shard, g) for g in groups]
            pending = await self._each([(_queue_xpending, self.stream(shard), _s(g["name"]))
                                        for shard, g in found])
            for summary in pending:
                if isinstance(summary, Exception) and "NOGROUP" not in str(summary):
                    raise summary
        out: dict[int, dict[str, GroupState]] = {shard: {} for shard in self.shards}
        for (shard, g), summary in zip(found, pending, strict=True):
            if isinstance(summary, Exception):
                continue  # destroyed since XINFO: it needs nothing any more
            name, last = _s(g["name"]), _s(g["last-delivered-id"])
            lag = g.get("lag") if name == lag_of else None
            if name == lag_of and lag is None:
                lag = await self._count_after(shard, last)
            out[shard][name] = GroupState(
                shard, exists=True, last_delivered=last,
                pending=int(summary.get("pending") or 0),
                min_pending=_s(summary["min"]) if summary.get("min") else None,
                lag=None if lag is None else int(lag))
        return out

    async def _each(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """One pipeline of ``calls`` (``(queue, *args)``), each reply or its error. Errors of a
        command (a missing stream, a group gone) are replies; a transient one (a connection
        lost, a slot moved: a failover) is retried within the budget first, as any pipeline's
        (on Redis Cluster re-reading the slot map), and raises when the budget is spent."""
        redis = self.redis
        for tolerant in (False, True):
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for queue, *args in calls:
                        queue(pipe, *args)
                    return list(await pipe.execute(raise_on_error=tolerant))
            except rexc.ResponseError:
                if tolerant:
                    raise
        raise AssertionError("unreachable")

    async def _count_after(self, shard: int, last: str, cap: int = 10_000) -> int:
        with redis_errors("lag"):
            got = await self.redis.xrange(self.stream(shard), f"({last}", "+", count=cap)
        return len(got)

    @staticmethod
    def floors_of(groups: Mapping[int, Mapping[str, GroupState]], require: Iterable[str] = ()
                  ) -> dict[int, str | None]:
        """Per shard, the oldest id any group on its stream still needs (:attr:`GroupState.
        floor`), or None when the stream must not be trimmed: it has no group, or lacks one of
        ``require``."""
        must = set(require)
        return {shard: min((g.floor for g in named.values()), key=id_key)
                if named and must <= set(named) else None
                for shard, named in groups.items()}

    async def floors(self, require: Iterable[str] = ()) -> dict[int, str | None]:
        """:meth:`floors_of` the groups as they are now."""
        return self.floors_of(await self.groups(), require)

    async def trim(self, require: Iterable[str] = ()) -> dict[int, int | None]:
        """Trim each stream (exactly, MINID) below its floor (:meth:`floors`). Returns the
        entries trimmed per shard, None where the stream was left alone."""
        return await self.trim_at(await self.floors(require))

    async def trim_at(self, floors: Mapping[int, str | None]) -> dict[int, int | None]:
        out: dict[int, int | None] = {}
        for shard, floor in floors.items():
            if floor is None:
                out[shard] = None
                continue
            # MINID keeps the floor entry itself (the last delivered one, when nothing is
            # pending, is acknowledged: keeping it costs nothing and needs no id arithmetic)
            with redis_errors("trim"):
                out[shard] = int(await self.redis.xtrim(self.stream(shard), minid=floor,
                                                        approximate=False))
        return out
