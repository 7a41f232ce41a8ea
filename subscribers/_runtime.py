"""The consumer-group runtime: one runner drives one subscriber over every shard feed.

One loop per runner; batches are handled one after the other, each acknowledged once handled
(the acknowledgement sent while the next batch is handled, and the next batch read while the
current one is handled: at most one of each in flight). Each round:

1. retries that are due (entries whose handling failed, after a backoff);
2. every ``claim_interval_ms``: a fenced XAUTOCLAIM pass (the core runtime's
   ``ConsumerGroup.reclaim``) taking entries idle for ``claim_idle_ms`` from dead or stuck
   consumers; entries delivered more than ``max_deliveries`` times go to the dead-letter stream
   instead;
3. XREADGROUP over all shard feeds (up to ``batch`` per shard), blocking at most until the next
   retry or reclaim is due.

Beside the loop, a heartbeat keeps the entries this runner holds (in hand or waiting to retry)
from looking idle, and a maintenance task refreshes the metrics and raises the checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from eventcore import CorruptEntry, ErrorInfo, EventLog, RedisError, RedisUnavailable
from eventcore._codec import feed_parts, fields_of
from eventcore._groups import Claimed, ConsumerGroup
from eventcore._lifetime import Running
from eventcore._streams import ShardStreams
from eventcore.errors import UsageError, ValidationError

from ._delivery import CheckpointStore, Delivery, Subscriber, decode_feed_entry
from ._metrics import SubscriberMetrics

__all__ = ["SubscriberRunner", "default_consumer_name", "is_transient"]

log_ = logging.getLogger("eventcore.subscribers")
#: entries decoded between two checkpoints of the event loop
_DECODE_SLICE = 256


def default_consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def is_transient(exc: BaseException) -> bool:
    """Failures of a backend rather than of the entry: retried with backoff for as long as it
    takes, without counting towards ``max_deliveries`` (a Redis or database outage must not
    dead-letter good entries)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_transient(e) for e in exc.exceptions)
    return isinstance(exc, (RedisUnavailable, OSError))


class _Item(msgspec.Struct, eq=False, gc=False):
    """A delivery in hand with its raw fields (for the dead-letter stream; as read: a dict, or
    Redis's flat list). One per entry on the hot path: built in C, and not tracked by the
    cyclic collector (it refers to no container that could lead back to it)."""

    delivery: Delivery
    fields: Any

    @property
    def key(self) -> tuple[int, str]:
        d = self.delivery
        return d.shard, d.entry_id


def _entry_ids(items: Sequence[_Item]) -> dict[int, list[str]]:
    """The entry ids of ``items`` by shard."""
    out: dict[int, list[str]] = {}
    for d in (i.delivery for i in items):
        shard, entry_id = d.shard, d.entry_id
        ids = out.get(shard)
        if ids is None:
            out[shard] = [entry_id]
        else:
            ids.append(entry_id)
    return out


class _Ahead:
    """The next batch, read while the current one is handled (at most one batch ahead)."""

    __slots__ = ("done", "error", "items")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.items: list[_Item] = []
        self.error: Exception | None = None


class _Acking:
    """The acknowledgement of a handled batch, sent while the next batch is handled (at most
    one at a time, in batch order)."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: Exception | None = None


@dataclass(slots=True)
class _Retry:
    due: float
    item: _Item


class SubscriberRunner(Running):
    """Runs one :class:`Subscriber` as consumer ``consumer`` of group ``group`` (default: the
    subscriber's ``name``) on every shard feed (or ``shards``).

    Use it as ``async with SubscriberRunner(log, sub) as runner:`` (started, groups ensured,
    stopped gracefully on exit), or ``await tg.start(runner.run)`` and later
    ``await runner.aclose()``. ``await runner.drain()`` instead processes everything available
    now (due retries and reclaimable entries included) and returns: the burst mode for tests
    and batch jobs.

    Guarantees: an entry is acknowledged only after ``handle`` returned for it (at least once);
    a group lost with Redis's data (NOGROUP) is recreated from the checkpoint, never from ``$``;
    a failing entry is retried with exponential backoff and after ``max_deliveries`` deliveries
    moved to the shard's dead-letter stream with the error, while everything else keeps flowing.
    Backend outages (:func:`is_transient`) are retried without limit instead.
    """

    def __init__(
        self,
        log: EventLog,
        subscriber: Subscriber,
        *,
        group: str | None = None,
        consumer: str | None = None,
        shards: Sequence[int] | None = None,
        batch: int = 256,
        block_ms: int = 2000,
        claim_idle_ms: int = 30_000,
        claim_interval_ms: int | None = None,
        max_deliveries: int = 8,
        backoff_s: tuple[float, float] = (0.05, 30.0),
        checkpoints: CheckpointStore | None = None,
        start_id: str = "0",
        metrics_interval_s: float = 5.0,
        drain_timeout_s: float = 30.0,
    ) -> None:
        if batch < 1 or max_deliveries < 1 or claim_idle_ms < 1:
            raise ValidationError("batch, max_deliveries and claim_idle_ms must be positive")
        if start_id == "$":
            raise ValidationError(
                "start_id '$' would skip entries appended before the group exists")
        self.log = log
        self.subscriber = subscriber
        self._raw_payloads = bool(getattr(subscriber, "raw_payloads", False))
        self.group = group or subscriber.name
        self.consumer = consumer or default_consumer_name()
        self.shards = list(log.keys.all_shards() if shards is None else shards)
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = (claim_interval_ms or max(claim_idle_ms // 2, 10)) / 1000
        self.lease_ms = max(int(self.claim_interval_s * 3000), 1000)
        self.max_deliveries = max_deliveries
        self.backoff_s = backoff_s
        self.checkpoints = checkpoints
        self.start_id = start_id
        self.metrics_interval_s = metrics_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = SubscriberMetrics(self.group, self.consumer)
        self._fg: ConsumerGroup | None = None
        self._retry: dict[tuple[int, str], _Retry] = {}
        # the batches in hand (read ahead, or being handled), by their list's identity: held
        # per batch, not per entry (no per-entry bookkeeping on the hot path)
        self._inflight: dict[int, list[_Item]] = {}
        self._cursor = dict.fromkeys(self.shards, "0-0")
        self._next_reclaim = 0.0
        self._outage_streak = 0  # consecutive Redis failures of the loop itself
        self._backend_streak = 0  # consecutive batches failed by a backend outage
        self._stopping = False
        self._read_scope: anyio.CancelScope | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._running = False
        self._done = anyio.Event()
        self._progress = anyio.Event()
        self._tg: TaskGroup | None = None
        self._ahead: _Ahead | None = None
        self._acking: _Acking | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def group_ops(self) -> ConsumerGroup:
        """The consumer-group runtime this runner drives (group ``group`` on the feeds)."""
        if self._fg is None:
            log = self.log
            self._fg = ConsumerGroup(
                ShardStreams(log.redis, log.keys.feed, self.shards), log.keys, self.group,
                self.consumer, start_id=self.start_id, store=self.checkpoints,
                on_recovered=self._recovered, channel=log.keys.notify,
                doorbell=log.settings.cluster_doorbell,
                safety_poll_s=log.settings.cluster_safety_poll_s)
        return self._fg

    async def ensure_groups(self) -> None:
        """Create the group on every shard feed where it is missing (at the checkpoint, else
        at ``start_id``)."""
        await self.group_ops.ensure()

    def stop(self) -> None:
        """Ask the runner to stop: the batch in hand is finished and acknowledged; nothing new
        is read; entries waiting for a retry stay pending for another consumer."""
        self._stopping = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def aclose(self) -> None:
        """Stop gracefully; after ``drain_timeout_s`` the batch in hand is abandoned (its
        entries stay pending and are reclaimed by another consumer)."""
        self.stop()
        if not self._running:
            return
        with anyio.move_on_after(self.drain_timeout_s, shield=True):
            await self._done.wait()
        if self._running and self._run_scope is not None:
            self._run_scope.cancel()
            with anyio.CancelScope(shield=True):
                await self._done.wait()

    async def run(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED, burst: bool = False
    ) -> None:
        """Ensure the groups, report ready, then consume until stopped (or, with ``burst``,
        until nothing is left to do now)."""
        if self._running:
            raise UsageError("this runner is already running")
        self._running, self._stopping, self._done = True, False, anyio.Event()
        try:
            with anyio.CancelScope() as self._run_scope:
                await self.ensure_groups()
                async with anyio.create_task_group() as tg:
                    self._tg, self._ahead, self._acking = tg, None, None
                    tg.start_soon(self._heartbeat)
                    if not burst:
                        tg.start_soon(self._maintenance)
                        if self.group_ops.doorbell is not None:  # Redis Cluster: see read()
                            # (not awaited: reads poll fast until it is subscribed)
                            tg.start_soon(self.group_ops.doorbell.listen)
                    task_status.started()
                    await self._loop(burst)
                    if burst:  # leave the checkpoint where the drain got to
                        await self.refresh_metrics()
                    tg.cancel_scope.cancel()
        finally:
            self._running = False
            self._run_scope = self._tg = self._ahead = self._acking = None
            with anyio.CancelScope(shield=True):
                await self._release_leases()
            self._done.set()
            self._notify()

    async def drain(self) -> int:
        """Process what is there now (new entries, due retries, reclaimable entries), waiting
        out retry backoffs, and return how many deliveries were handled."""
        before = self.metrics.delivered
        await self.run(burst=True)
        return self.metrics.delivered - before

    async def _release_leases(self) -> None:
        if self._fg is None:
            return
        try:
            with anyio.move_on_after(2):
                await self._fg.release_leases()
        except RedisError:
            pass  # they expire anyway

    # -- observing -------------------------------------------------------------------------------
    def _notify(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    async def wait_until(self, predicate: Callable[[SubscriberMetrics], bool]) -> None:
        """Return once ``predicate(self.metrics)`` holds, checked after every batch (bound the
        wait with ``anyio.fail_after``)."""
        while not predicate(self.metrics):
            if self._done.is_set() and not self._running:
                raise UsageError("the runner stopped before the condition held")
            await self._progress.wait()

    async def refresh_metrics(self) -> SubscriberMetrics:
        """Query the group's lag and pending counts now (and raise the checkpoints)."""
        states = await self.group_ops.state()
        self.metrics.lag = sum(s.lag or 0 for s in states if s.exists)
        self.metrics.pending = sum(s.pending for s in states if s.exists)
        self.metrics.retry_queue = len(self._retry)
        await self.group_ops.save_checkpoints(states)
        return self.metrics

    async def _maintenance(self) -> None:
        ticks = 0
        while True:
            await anyio.sleep(self.metrics_interval_s)
            ticks += 1
            try:
                await self.refresh_metrics()
                if ticks % 60 == 0:
                    await self.group_ops.forget_idle_consumers(max(self.claim_idle_ms * 10,
                                                                   3_600_000))
            except Exception as exc:  # Redis or the checkpoint store: try again next tick
                log_.warning("subscriber %s: metrics/checkpoint refresh failed: %r",
                             self.group, exc)
            self._notify()

    async def _heartbeat(self) -> None:
        every = max(self.claim_idle_ms / 3000, 0.02)
        while True:
            await anyio.sleep(every)
            held: dict[int, list[str]] = {}
            for shard, entry_id in [*self._held(), *self._retry]:
                held.setdefault(shard, []).append(entry_id)
            if held:
                try:
                    await self.group_ops.touch(held)
                except RedisError as exc:
                    log_.debug("subscriber %s: heartbeat failed: %s", self.group, exc)

    # -- the loop --------------------------------------------------------------------------------
    async def _loop(self, burst: bool) -> None:
        while not self._stopping:
            try:
                more = await self._step(burst)
                self._outage_streak = 0
            except RedisError as exc:
                if await self.group_ops.recovered(exc):
                    continue
                if "UNBLOCKED" in str(exc):  # the feed was deleted under a blocked read
                    continue
                self.metrics.redis_outages += 1
                self._outage_streak += 1
                log_.warning("subscriber %s: Redis failed (%s); retrying", self.group, exc)
                await anyio.sleep(self._backoff(self._outage_streak))
                continue
            if not more:
                break
        if self._ahead is not None and not self._ahead.done.is_set():
            await self._ahead.done.wait()
        if self._ahead is not None and self._ahead.items:  # read already: finish it too
            ahead, self._ahead = self._ahead, None
            await self._process(ahead.items)
        try:
            await self._acked()
        except RedisError as exc:  # left pending: redelivered like any other pending entry
            log_.warning("subscriber %s: the last acknowledgement failed (%s); its entries "
                         "stay pending", self.group, exc)

    async def _recovered(self, created: list[int]) -> None:
        self._cursor = dict.fromkeys(self.shards, "0-0")
        self.metrics.nogroup_recoveries += 1
        log_.warning("subscriber %s: consumer group was gone on shards %s; recreated from "
                     "the checkpoint", self.group, created)

    async def _step(self, burst: bool) -> bool:
        """One round; False when the runner should stop (stop requested, or burst is done)."""
        now = time.monotonic()
        due = [r.item for r in self._retry.values() if r.due <= now]
        if due:
            for item in due:
                del self._retry[item.key]
            self.metrics.redeliveries += len(due)
            await self._process(due)
            return True
        if now >= self._next_reclaim:  # in a drain too: once first, then when the feed is done
            self._next_reclaim = now + self.claim_interval_s
            claimed = await self._reclaim_pass()
            if claimed:
                await self._process(claimed)
                return True
        block: int | None = None
        if not burst:
            wake = min([self._next_reclaim, *(r.due for r in self._retry.values())])
            block = max(1, min(self.block_ms, math.ceil((wake - time.monotonic()) * 1000)))
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            await ahead.done.wait()
            if ahead.error is not None:
                raise ahead.error
            if ahead.items:
                await self._process(ahead.items, read_ahead=True)
                return True
        with anyio.CancelScope() as scope:
            self._read_scope = scope
            if self._stopping:
                scope.cancel()
            raw = await self.group_ops.read(self.batch, block, pairs=True)
        self._read_scope = None
        if scope.cancelled_caught:
            return False
        if raw:
            items = await self._decode(raw)
            if items:
                await self._process(items, read_ahead=True)
            return True
        if burst:
            claimed = await self._reclaim_pass()
            if claimed:
                await self._process(claimed)
                return True
            if not self._retry:
                return False
            await anyio.sleep(max(0.0, min(r.due for r in self._retry.values()) - now))
        return True

    async def _reclaim_pass(self) -> list[_Item]:
        found: list[tuple[int, Claimed]] = []
        inflight = set(self._held())
        for shard in self.shards:
            step = await self.group_ops.reclaim(
                shard, cursor=self._cursor[shard], min_idle_ms=self.claim_idle_ms,
                count=self.batch, lease_ms=self.lease_ms, max_deliveries=self.max_deliveries,
            )
            self._cursor[shard] = step.cursor
            self.metrics.dead_lettered += step.dead
            found += [(shard, c) for c in step.claimed
                      if (shard, c.entry_id) not in self._retry
                      and (shard, c.entry_id) not in inflight]  # held here already
        if not found:
            return []
        self.metrics.reclaimed += len(found)
        self.metrics.redeliveries += len(found)
        return await self._decode([(s, c.entry_id, c.fields) for s, c in found],
                                  [c.deliveries for _, c in found])

    async def _decode(self, raw: Sequence[tuple[int, str, Any]],
                      attempts: Sequence[int] | None = None) -> list[_Item]:
        """Feed entries to deliveries (``attempts``: each one's delivery count; default 1);
        an entry that is not an envelope is dead-lettered at once (no retry can fix it)."""
        items: list[_Item] = []
        refs: list[_Item] = []
        append = items.append
        raw_payloads = self._raw_payloads
        for start in range(0, len(raw), _DECODE_SLICE):
            if start:
                # let the batch in hand go on meanwhile: a read-ahead decodes while that
                # batch waits for its backend, not while the backend waits for it
                await anyio.lowlevel.checkpoint()
            for n, (shard, entry_id, fields) in enumerate(raw[start:start + _DECODE_SLICE],
                                                          start):
                attempt = 1 if attempts is None else attempts[n]
                try:
                    env, body, server_body, inc, blob = feed_parts(fields,
                                                                   raw_payloads=raw_payloads)
                except CorruptEntry:  # again, naming the entry in the error (the rare path)
                    try:
                        decode_feed_entry(fields_of(fields),
                                          f"{self.group_ops.stream(shard)} {entry_id}")
                        raise AssertionError("decoding a feed entry is deterministic") from None
                    except CorruptEntry as exc:
                        await self._dead_letter(shard, entry_id, fields, attempt, exc)
                    continue
                if blob:  # its JSON holds the blob's ref, not the payload
                    refs.append(_Item(Delivery(entry_id, shard, env, attempt, inc), fields))
                    continue
                append(_Item(Delivery(entry_id, shard, env, attempt, inc, body, server_body),
                             fields))
        for item in refs:  # rare (large payloads): one by one, so a missing blob is isolated
            try:
                (env,) = await self.log.hydrate([item.delivery.envelope])
            except CorruptEntry as exc:
                d = item.delivery
                await self._dead_letter(d.shard, d.entry_id, item.fields, d.attempt, exc)
                continue
            items.append(_Item(msgspec.structs.replace(item.delivery, envelope=env),
                               item.fields))
        return items

    async def _read_ahead(self, ahead: _Ahead) -> None:
        """Read (without blocking) and decode the next batch while the current one is handled.
        Its entries are held (heartbeat) from the moment they are decoded; nothing of it is
        acknowledged before it is handled in turn, so an abandoned read-ahead is redelivered
        like any pending entry. A failure surfaces when the next round takes the batch."""
        try:
            raw = await self.group_ops.read(self.batch, None, pairs=True)
            if raw:
                ahead.items = await self._decode(raw)
                self._inflight[id(ahead.items)] = ahead.items
        except Exception as exc:
            ahead.error = exc
        finally:
            ahead.done.set()

    def _held(self) -> list[tuple[int, str]]:
        """The (shard, entry id) of every entry in hand."""
        return [item.key for batch in self._inflight.values() for item in batch]

    # -- handling --------------------------------------------------------------------------------
    async def _process(self, items: list[_Item], *, read_ahead: bool = False) -> None:
        """Handle a batch and acknowledge what succeeded. ``read_ahead``: meanwhile read the
        next batch (a full batch suggests more is waiting), so Redis and the subscriber's
        backend work at the same time; batches are still handled one after the other."""
        started = time.perf_counter()
        self._inflight[id(items)] = items
        if read_ahead and not self._stopping and self._tg is not None and self._ahead is None:
            self._ahead = _Ahead()
            self._tg.start_soon(self._read_ahead, self._ahead)
        acking = False
        try:
            self.metrics.delivered += len(items)
            ok, failed = await self._handle(items)
            await self._acked()  # the previous batch's, sent while this one was handled
            if ok and self._tg is not None:
                # sent while the next batch is handled; held (heartbeat) until acknowledged
                self._acking = _Acking()
                self._tg.start_soon(self._ack, items, ok, self._acking)
                acking = True
            else:
                await self.group_ops.ack(_entry_ids(ok))
                self.metrics.acked += len(ok)
            outage = bool(failed) and all(is_transient(exc) for _, exc in failed)
            self._backend_streak = self._backend_streak + 1 if outage else 0
            for item, exc in failed:
                await self._failed(item, exc)
            if outage:
                exc = failed[0][1]
                log_.warning("subscriber %s: backend unavailable (%s: %s); %d entries wait to "
                             "be retried", self.group, type(exc).__name__, exc, len(failed))
        finally:
            if not acking:
                self._inflight.pop(id(items), None)
        self.metrics.retry_queue = len(self._retry)
        self.metrics.record_batch((time.perf_counter() - started) * 1000)
        self._notify()

    async def _ack(self, items: list[_Item], ok: list[_Item], acking: _Acking) -> None:
        """Acknowledge the handled entries ``ok`` of batch ``items`` (a task of its own); a
        failure surfaces when the next batch, or the end of the loop, waits for it (the
        entries stay pending, redelivered like any other)."""
        try:
            await self.group_ops.ack(_entry_ids(ok))
            self.metrics.acked += len(ok)
        except Exception as exc:
            acking.error = exc
        finally:
            self._inflight.pop(id(items), None)
            acking.done.set()
            self._notify()

    async def _acked(self) -> None:
        """Wait for the acknowledgement in flight, if any; raise what failed it."""
        acking, self._acking = self._acking, None
        if acking is not None:
            await acking.done.wait()
            if acking.error is not None:
                raise acking.error

    async def _handle(
        self, items: list[_Item]
    ) -> tuple[list[_Item], list[tuple[_Item, Exception]]]:
        try:
            await self.subscriber.handle([i.delivery for i in items])
            return items, []
        except Exception as exc:
            if len(items) == 1 or is_transient(exc):
                return [], [(i, exc) for i in items]
        # Something in the batch failed: one by one, so the rest is not held back by it.
        ok, failed = [], []
        for item in items:
            try:
                await self.subscriber.handle([item.delivery])
                ok.append(item)
            except Exception as exc:
                failed.append((item, exc))
        return ok, failed

    def _backoff(self, attempt: int) -> float:
        base, cap = self.backoff_s
        return random.uniform(0.5, 1.0) * min(cap, base * 2.0 ** min(max(0, attempt - 1), 30))

    async def _failed(self, item: _Item, exc: Exception) -> None:
        d = item.delivery
        if is_transient(exc):
            self.metrics.transient_failures += 1
            due = time.monotonic() + self._backoff(self._backend_streak)
            self._retry[item.key] = _Retry(due, item)
            return
        self.metrics.failures += 1
        if d.attempt >= self.max_deliveries:
            log_.error("subscriber %s: entry %s (session %s seq %d) failed %d times; "
                       "dead-lettered: %r", self.group, d.entry_id, d.session_id, d.seq,
                       d.attempt, exc)
            await self._dead_letter(d.shard, d.entry_id, item.fields, d.attempt, exc)
            return
        nxt = msgspec.structs.replace(d, attempt=d.attempt + 1)
        self._retry[item.key] = _Retry(time.monotonic() + self._backoff(d.attempt),
                                       _Item(nxt, item.fields))

    async def _dead_letter(
        self, shard: int, entry_id: str, fields: Mapping[bytes, bytes] | list[bytes],
        deliveries: int, exc: BaseException,
    ) -> None:
        info = ErrorInfo.from_exception(exc)
        if isinstance(exc, CorruptEntry):
            info = ErrorInfo(type=info.type, message=info.message, retryable=False)
        await self.group_ops.dead_letter(shard, entry_id, fields_of(fields), deliveries, info)
        self.metrics.dead_lettered += 1
