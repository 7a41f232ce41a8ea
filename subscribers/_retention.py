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
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from eventcore import EventLog, RedisError
from eventcore._lifetime import Running
from eventcore._redis import Redis, is_cluster, redis_errors, run_scripts
from eventcore._redis import text as _s
from eventcore._scripts import lua
from eventcore._streams import ShardStreams

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from ._persistence import Persistence  # needs the sql extra: only for the type

__all__ = ["Retention", "RetentionReport"]

log_ = logging.getLogger("eventcore.retention")
_TRIM_LUA = lua("eventcore.subscribers", "trim_session", with_layout=True)


@dataclass
class RetentionReport:
    sessions_scanned: int = 0
    session_entries_trimmed: int = 0
    feed_entries_trimmed: int = 0
    feeds_skipped: list[int] = field(default_factory=list)
    dead_letters_trimmed: int = 0


class Retention(Running):
    """Trims session streams and shard feeds every ``interval_s`` (or once: :meth:`run_once`).

    ``async with Retention(...)`` runs it in the background (the first pass starts at once);
    :meth:`aclose` stops it.

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
        self._trim: AsyncScript | None = None
        self._feeds = ShardStreams(log.redis, log.keys.feed, log.keys.all_shards())
        self._scope: anyio.CancelScope | None = None

    async def aclose(self) -> None:
        """Stop the background passes (a pass in progress is abandoned: trims are idempotent)."""
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """A pass every ``interval_s`` until :meth:`aclose` (or cancelled)."""
        with anyio.CancelScope() as self._scope:
            task_status.started()
            while True:
                try:
                    self.last = await self.run_once()
                    self._passed.set()
                    self._passed = anyio.Event()
                except RedisError as exc:
                    log_.warning("retention pass failed: %s", exc)
                await anyio.sleep(self.interval_s)
        self._scope = None

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
        """SCAN the session streams (on Redis Cluster: every master's keyspace in turn, SCAN
        being a per-node command) and trim each below what the archive holds, one pipelined
        script call per session (each in its own slot)."""
        redis = self.log.redis
        if not is_cluster(redis):
            await self._trim_sessions_on(redis, None, report)
            return
        with redis_errors("retention scan"):
            masters = redis.get_primaries()  # type: ignore[attr-defined]
        for node in masters:
            await self._trim_sessions_on(redis, node, report)

    async def _trim_sessions_on(self, redis: Redis, node: object, report: RetentionReport
                                ) -> None:
        keys = self.log.keys
        cutoff_ms = int((time.time() - self.hot_window_s) * 1000)
        on = {} if node is None else {"target_nodes": node}
        cursor = 0
        while True:
            with redis_errors("retention scan"):
                reply = await redis.scan(
                    cursor, match=keys.session_pattern(), count=self.scan_count,
                    _type="stream", **on)
            cursor, found = reply
            if isinstance(cursor, dict):  # a cluster client answers {node name: cursor}
                (cursor,) = cursor.values()
            sids = [_s(k).split(":session/", 1)[1] for k in found]
            report.sessions_scanned += len(sids)
            if sids:
                floors = await self.archive.stored_before(sids, cutoff_ms)
                if floors:
                    if self._trim is None:
                        self._trim = redis.register_script(_TRIM_LUA)
                    with redis_errors("retention trim"):
                        # a trim is idempotent: the batch may be sent again
                        trimmed = await run_scripts(redis, self._trim, [
                            ([keys.session(sid).stream, keys.session(sid).meta],
                             [f"0-{seq + 1}", inc]) for sid, (seq, inc) in floors.items()])
                    report.session_entries_trimmed += sum(int(n) for n in trimmed)
            if int(cursor) == 0:
                return

    async def trim_feeds(self, report: RetentionReport) -> None:
        trimmed = await self._feeds.trim(require=self.groups or ())
        for shard, n in trimmed.items():
            if n is None:
                report.feeds_skipped.append(shard)
            else:
                report.feed_entries_trimmed += n
