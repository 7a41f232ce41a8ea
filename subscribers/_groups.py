"""Consumer-group plumbing on the shard feeds: create/recreate, claim, touch, dead-letter,
checkpoints and group state. The runner (``_runtime.py``) decides when; this module knows how."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.exceptions as rexc

from eventcore import ErrorInfo, Keys
from eventcore._codec import encode
from eventcore._redis import Redis, redis_errors

from ._delivery import CheckpointStore

__all__ = ["FeedGroup", "GroupState", "id_key", "id_pred", "is_nogroup"]

_LUA = resources.files("eventcore.subscribers").joinpath("_lua")
_MAX_U64 = 2**64 - 1
_TOUCH_CHUNK = 1000


def _script(name: str) -> str:
    return _LUA.joinpath(name).read_text()


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_pred(entry_id: str) -> str:
    """The greatest stream id below ``entry_id``."""
    ms, seq = id_key(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_MAX_U64}" if ms > 0 else "0-0"


def is_nogroup(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, rexc.ResponseError) and "NOGROUP" in str(exc):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


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


@dataclass(frozen=True, slots=True)
class Claimed:
    entry_id: str
    deliveries: int
    fields: dict[bytes, bytes]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FeedGroup:
    """One consumer group over a set of shard feeds, as seen by one consumer."""

    def __init__(
        self, redis: Redis, keys: Keys, group: str, consumer: str, shards: Sequence[int],
        *, store: CheckpointStore | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.shards = list(shards)
        self.store = store
        self.checkpoints: dict[int, str] = {}
        self._reclaim = redis.register_script(_script("reclaim.lua"))
        self._touch = redis.register_script(_script("touch.lua"))
        self._raise_checkpoint = redis.register_script(_script("checkpoint.lua"))
        self._release = redis.register_script(_script("release.lua"))
        self.feeds = {keys.feed(s): s for s in self.shards}
        self.feed_names = {s: feed for feed, s in self.feeds.items()}

    # -- groups --------------------------------------------------------------------------------
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

    async def ensure(self, start_id: str, shards: Iterable[int] | None = None) -> list[int]:
        """Create the group on each shard feed where it is missing, at the shard's checkpoint
        if one is known, else at ``start_id`` (never ``$``). Returns the shards created."""
        created = []
        for shard in self.shards if shards is None else shards:
            start = await self.checkpoint_of(shard) or start_id
            try:
                with redis_errors("create group"):
                    await self.redis.xgroup_create(
                        self.keys.feed(shard), self.group, id=start, mkstream=True
                    )
                created.append(shard)
            except Exception as exc:
                if "BUSYGROUP" not in str(exc.__cause__ or exc):
                    raise
        return created

    # -- reading and acknowledging ---------------------------------------------------------------
    async def read(self, count: int, block_ms: int | None) -> list[tuple[int, str, Any]]:
        with redis_errors("read feed"):
            got = await self.redis.xreadgroup(
                self.group, self.consumer, dict.fromkeys(self.feeds, ">"), count=count,
                block=block_ms,
            )
        out = []
        for stream, entries in got or ():
            shard = self.feeds[_s(stream)]
            for entry_id, fields in entries:
                out.append((shard, _s(entry_id), fields))
        return out

    async def ack(self, ids: Mapping[int, Sequence[str]]) -> None:
        if not ids:
            return
        with redis_errors("ack"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, entry_ids in ids.items():
                    pipe.xack(self.keys.feed(shard), self.group, *entry_ids)
                await pipe.execute()

    async def dead_letter(
        self, shard: int, entry_id: str, fields: Mapping[bytes, bytes], deliveries: int,
        error: ErrorInfo,
    ) -> None:
        """Move one entry to the shard's dead-letter stream with the error, and ack it, in one
        transaction (both keys are in the shard's slot)."""
        record: dict[str | bytes, Any] = {
            "kind": "subscriber", "group": self.group, "consumer": self.consumer,
            "feed": self.keys.feed(shard), "entry": entry_id, "deliveries": str(deliveries),
            "error": encode(error),
        }
        for name, value in fields.items():
            record[b"f." + name] = value
        with redis_errors("dead-letter"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.keys.dead(shard), record)  # type: ignore[arg-type]
                pipe.xack(self.keys.feed(shard), self.group, entry_id)
                await pipe.execute()

    # -- reclaiming ------------------------------------------------------------------------------
    async def reclaim(
        self, shard: int, *, cursor: str, min_idle_ms: int, count: int, lease_ms: int,
        max_deliveries: int,
    ) -> tuple[bool, str, list[Claimed], int]:
        """One fenced XAUTOCLAIM step: (held the lease, next cursor, claimed, dead-lettered)."""
        error = encode(ErrorInfo(
            type="DeliveryLimit", retryable=False,
            message=f"delivered more than {max_deliveries} times without an acknowledgement "
                    "(its consumers died or timed out)",
        ))
        with redis_errors("reclaim"):
            res = await self._reclaim(
                keys=[self.keys.reclaim_lock(self.group, shard), self.keys.feed(shard),
                      self.keys.dead(shard)],
                args=[self.consumer, lease_ms, self.group, min_idle_ms, cursor, count,
                      max_deliveries, error],
            )
        if int(res[0]) == 0:
            return False, cursor, [], 0
        claimed = []
        for entry_id, n, flat in res[2]:
            fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
            claimed.append(Claimed(_s(entry_id), int(n), fields))
        return True, _s(res[1]), claimed, int(res[3])

    async def release(self) -> None:
        with redis_errors("release lease"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in self.shards:
                    await self._release(
                        keys=[self.keys.reclaim_lock(self.group, shard)], args=[self.consumer],
                        client=pipe,
                    )
                await pipe.execute()

    async def touch(self, ids: Mapping[int, Sequence[str]]) -> int:
        kept = 0
        with redis_errors("touch"):
            for shard, entry_ids in ids.items():
                for i in range(0, len(entry_ids), _TOUCH_CHUNK):
                    chunk = list(entry_ids[i : i + _TOUCH_CHUNK])
                    kept += int(await self._touch(
                        keys=[self.keys.feed(shard)], args=[self.group, self.consumer, *chunk]
                    ))
        return kept

    # -- state and checkpoints -------------------------------------------------------------------
    async def state(self) -> list[GroupState]:
        """Each shard's group state, in two round trips (lag counted by hand on Redis 6.2)."""
        with redis_errors("group state"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in self.shards:
                    pipe.xinfo_groups(self.keys.feed(shard))
                    pipe.xpending(self.keys.feed(shard), self.group)
                raw = await pipe.execute(raise_on_error=False)
        out = []
        for i, shard in enumerate(self.shards):
            groups, pending = raw[2 * i], raw[2 * i + 1]
            info = None
            if not isinstance(groups, Exception):
                info = next((g for g in groups if _s(g.get("name")) == self.group), None)
            if info is None or isinstance(pending, Exception):
                out.append(GroupState(shard, exists=False))
                continue
            lag = info.get("lag")
            out.append(GroupState(
                shard, exists=True, last_delivered=_s(info.get("last-delivered-id", "0-0")),
                pending=int(pending.get("pending") or 0),
                min_pending=_s(pending["min"]) if pending.get("min") else None,
                lag=int(lag) if lag is not None else await self._count_after(
                    shard, _s(info.get("last-delivered-id", "0-0"))),
            ))
        return out

    async def _count_after(self, shard: int, last: str, cap: int = 10_000) -> int:
        with redis_errors("lag"):
            got = await self.redis.xrange(self.keys.feed(shard), f"({last}", "+", count=cap)
        return len(got)

    async def save_checkpoints(self, states: Sequence[GroupState]) -> None:
        """Raise each shard's checkpoint to what the group has acknowledged: in this process,
        in Redis, and in the external store if there is one."""
        moved = []
        for st in states:
            if not st.exists:
                continue
            safe = st.safe_id
            old = self.checkpoints.get(st.shard)
            if old is not None and id_key(old) >= id_key(safe):
                continue
            self.checkpoints[st.shard] = safe
            moved.append(st)
        if not moved:
            return
        with redis_errors("checkpoint"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for st in moved:
                    await self._raise_checkpoint(
                        keys=[self.keys.checkpoint(self.group, st.shard)],
                        args=[self.checkpoints[st.shard]], client=pipe,
                    )
                await pipe.execute()
        if self.store is not None:
            for st in moved:
                await self.store.save_checkpoint(self.group, st.shard, self.checkpoints[st.shard])

    async def forget_idle_consumers(self, idle_ms: int) -> int:
        """Delete consumers with nothing pending that have been silent for ``idle_ms`` (each
        process start adds a consumer name; dead ones would otherwise pile up)."""
        removed = 0
        for shard in self.shards:
            feed = self.keys.feed(shard)
            with redis_errors("consumers"):
                try:
                    consumers = await self.redis.xinfo_consumers(feed, self.group)
                except rexc.ResponseError:
                    continue
                for c in consumers:
                    name = _s(c.get("name"))
                    if (name != self.consumer and int(c.get("pending", 0)) == 0
                            and int(c.get("idle", 0)) > idle_ms):
                        await self.redis.xgroup_delconsumer(feed, self.group, name)
                        removed += 1
        return removed
