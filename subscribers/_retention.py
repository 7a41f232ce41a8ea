"""Retention: trim what Redis no longer needs to hold, and nothing else.

- A session stream is trimmed (exactly, ``XTRIM MINID``) below the lower of: the persisted
  watermark (every seq up to it is in the archive) and the newest seq published before the hot
  window, if the archive holds the session's current incarnation. Reads of trimmed seqs
  continue from the archive (tiered replay).
- A shard feed is trimmed below what every consumer group on it has acknowledged: the lowest
  pending entry of any group, or its last delivered entry. A feed with no group, or missing
  one of the ``groups`` that must see everything, is not trimmed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus

from eventcore import EventLog, RedisError
from eventcore._redis import redis_errors

from ._groups import id_key, id_pred
from ._persistence import Persistence

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["Retention", "RetentionReport"]

log_ = logging.getLogger("eventcore.retention")
_TRIM_LUA = resources.files("eventcore.subscribers").joinpath("_lua/trim_session.lua").read_text()


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class RetentionReport:
    sessions_scanned: int = 0
    session_entries_trimmed: int = 0
    feed_entries_trimmed: int = 0
    feeds_skipped: list[int] = field(default_factory=list)
    dead_letters_trimmed: int = 0


class Retention:
    """Trims session streams and shard feeds every ``interval_s`` (or once: :meth:`run_once`).

    ``hot_window_s``: how long envelopes stay in Redis after publication even when archived
    (live readers and SSE catch-up stay on Redis). ``groups``: consumer groups that must exist
    on a feed before it is trimmed (default: whichever exist, and never a feed with none).
    ``dead_letter_max_age_s`` / ``dead_letter_maxlen``: each shard's dead-letter stream keeps
    the entries of that age and at most that many (the newest); ``None`` keeps them all.
    """

    def __init__(
        self,
        log: EventLog,
        archive: Persistence,
        *,
        hot_window_s: float = 3600.0,
        interval_s: float = 60.0,
        groups: Sequence[str] | None = None,
        scan_count: int = 500,
        dead_letter_max_age_s: float | None = 30 * 24 * 3600.0,
        dead_letter_maxlen: int | None = 100_000,
    ) -> None:
        self.log = log
        self.dead_letter_max_age_s = dead_letter_max_age_s
        self.dead_letter_maxlen = dead_letter_maxlen
        self.archive = archive
        self.hot_window_s = hot_window_s
        self.interval_s = interval_s
        self.groups = list(groups) if groups is not None else None
        self.scan_count = scan_count
        self.last: RetentionReport | None = None
        self._passed = anyio.Event()
        self._tg: TaskGroup | None = None
        self._trim: AsyncScript | None = None

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._tg.start(self.run)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._tg is not None:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                self.last = await self.run_once()
                self._passed.set()
                self._passed = anyio.Event()
            except RedisError as exc:
                log_.warning("retention pass failed: %s", exc)
            await anyio.sleep(self.interval_s)

    async def next_pass(self) -> RetentionReport:
        """The report of the next pass the background task completes."""
        await self._passed.wait()
        assert self.last is not None
        return self.last

    async def run_once(self) -> RetentionReport:
        report = RetentionReport()
        await self.trim_sessions(report)
        await self.trim_feeds(report)
        await self.trim_dead_letters(report)
        return report

    async def trim_dead_letters(self, report: RetentionReport) -> None:
        """Dead letters are for people to look at: keep them for a while, not forever."""
        keys, redis = self.log.keys, self.log.redis
        with redis_errors("retention trim dead letters"):
            async with redis.pipeline(transaction=False) as pipe:
                for shard in keys.all_shards():
                    if self.dead_letter_max_age_s is not None:
                        floor = int((time.time() - self.dead_letter_max_age_s) * 1000)
                        pipe.xtrim(keys.dead(shard), minid=f"{max(floor, 0)}-0",
                                   approximate=False)
                    if self.dead_letter_maxlen is not None:
                        pipe.xtrim(keys.dead(shard), maxlen=self.dead_letter_maxlen,
                                   approximate=False)
                trimmed = await pipe.execute()
        report.dead_letters_trimmed += sum(int(n) for n in trimmed)

    async def trim_sessions(self, report: RetentionReport) -> None:
        keys, redis = self.log.keys, self.log.redis
        cutoff_ms = int((time.time() - self.hot_window_s) * 1000)
        cursor = 0
        while True:
            with redis_errors("retention scan"):
                cursor, found = await redis.scan(
                    cursor, match=keys.session_pattern(), count=self.scan_count, _type="stream"
                )
            sids = [_s(k).split(":session/", 1)[1] for k in found]
            report.sessions_scanned += len(sids)
            if sids:
                floors = await self.archive.stored_before(sids, cutoff_ms)
                if floors:
                    if self._trim is None:
                        self._trim = redis.register_script(_TRIM_LUA)
                    with redis_errors("retention trim"):
                        async with redis.pipeline(transaction=False) as pipe:
                            for sid, (seq, inc) in floors.items():
                                sk = keys.session(sid)
                                await self._trim(keys=[sk.stream, sk.meta],
                                                 args=[f"0-{seq + 1}", inc], client=pipe)
                            trimmed = await pipe.execute()
                    report.session_entries_trimmed += sum(int(n) for n in trimmed)
            if cursor == 0:
                return

    async def feed_floor(self, shard: int) -> str | None:
        """The id below which every group on the shard's feed has acknowledged everything, or
        None when the feed must not be trimmed."""
        feed, redis = self.log.keys.feed(shard), self.log.redis
        with redis_errors("retention groups"):
            try:
                groups = await redis.xinfo_groups(feed)
            except Exception as exc:
                if "no such key" in str(exc).lower():
                    return None
                raise
            names = [_s(g["name"]) for g in groups]
            if not names or (self.groups and not set(self.groups) <= set(names)):
                return None
            floors = []
            for g in groups:
                pending = await redis.xpending(feed, _s(g["name"]))
                if pending.get("min"):
                    floors.append(id_pred(_s(pending["min"])))
                else:
                    floors.append(_s(g["last-delivered-id"]))
        return min(floors, key=id_key)

    async def trim_feeds(self, report: RetentionReport) -> None:
        for shard in self.log.keys.all_shards():
            floor = await self.feed_floor(shard)
            if floor is None:
                report.feeds_skipped.append(shard)
                continue
            # MINID keeps the floor entry itself: it is acknowledged, but keeping one entry
            # costs nothing and keeps the arithmetic on ids simple.
            with redis_errors("retention trim feed"):
                report.feed_entries_trimmed += int(
                    await self.log.redis.xtrim(self.log.keys.feed(shard), minid=floor,
                                               approximate=False)
                )
