"""The Worker: reads the dispatch streams, claims sessions and hosts their handlers.

Lifecycle of a hosted session (see the README's workers section for the whole picture)::

    dispatch entry --XREADGROUP/XAUTOCLAIM--> claim.lua (lease, epoch+1, state active,
                                                          session.started)
      -> handler runs as a task in the sessions task group, fed by the Feed
      -> it returns / fails / is cancelled / times out / idles out / is handed back
      -> _settle(): session.ended and release.lua (ack, retry, dead-letter, unload, handback)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from eventcore import EventLog, validate_session_id
from eventcore._codec import dispatch_session, session_started_parts
from eventcore._groups import ConsumerGroup
from eventcore._lifetime import Running
from eventcore._redis import is_cluster, redis_errors, run_script, run_scripts
from eventcore._redis import text as _text
from eventcore._streams import ShardStreams, id_key
from eventcore._tasks import TaskSet
from eventcore.errors import (
    AppendNotReplicated,
    EventcoreError,
    NoSuchAgent,
    RedisError,
    RedisUnavailable,
    UsageError,
    ValidationError,
    WorkerFailed,
)

from ._app import AgentSpec, App, RetryPolicy
from ._feed import Feed
from ._heartbeat import Heartbeat, LeaseRec
from ._metrics import WorkerMetrics
from ._presence import Presence
from ._scripts import GROUP, Claim, Coalescer, decode_claim, load_script, release_item
from ._session import Session
from ._settle import settle
from ._slots import Slots
from ._supervisor import Supervisor

__all__ = ["Worker"]

log = logging.getLogger("workers")
CLAIM_LUA = load_script("claim", with_prelude=True)
RELEASE_LUA = load_script("release", with_prelude=True)
DELAYED_LUA = load_script("delayed", with_prelude=True)
REQUEUE_LUA = load_script("requeue", with_prelude=True)
TAKEOVER_LUA = load_script("takeover")


GC_THRESHOLD = (100_000, 50, 1000)
"""The cyclic GC's thresholds while a worker serves (Python's default: 700, 10, 10)."""
_gc_state: dict[str, Any] = {"users": 0, "saved": None}


@contextlib.contextmanager
def _fewer_collections(on: bool) -> Iterator[None]:
    """Hosting a session allocates many short-lived objects (tasks, cancel scopes, envelopes,
    replies), so at Python's default threshold a young-generation collection runs every 700
    allocations and, at a thousand hosted sessions, the GC took about a quarter of the
    worker's CPU (benchmarks/dispatch.py: 0.24 -> 0.16 ms per session lifecycle with
    :data:`GC_THRESHOLD`). Cyclic garbage then waits for up to 100k allocations, a few MB at
    most. Set while any worker of the process serves, the previous thresholds restored
    after the last."""
    if not on:
        yield
        return
    st = _gc_state
    if st["users"] == 0:
        st["saved"] = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLD)
    st["users"] += 1
    try:
        yield
    finally:
        st["users"] -= 1
        if st["users"] == 0 and st["saved"] is not None:
            gc.set_threshold(*st["saved"])


async def _no_handler(session: Session) -> None:
    raise NoSuchAgent(f"no agent named {session.agent!r} is registered in this worker's app")


class Worker(Running):
    """Hosts sessions of ``app``'s agents from the dispatch streams of ``log``.

    ``async with worker:`` (or ``await tg.start(worker.run)``) returns once the consumer groups
    exist and the worker is consuming, and leaving the block stops it (:meth:`aclose`);
    :meth:`run_burst` returns when there is nothing left to do. ``concurrency`` is
    ``max_concurrent_sessions``; ``lease_ttl_s`` is how long a dead worker's sessions wait
    before another worker takes them over, unless its process died: then its connections close,
    and within ``presence_interval_s`` another worker sees it and takes them over at once
    (:mod:`workers._presence`; ``None`` turns that off, leaving only the lease).
    ``tune_gc``: while serving, the process's cyclic GC runs less often (:data:`GC_THRESHOLD`;
    a quarter of the worker's CPU went to it at Python's default).
    """

    def __init__(
        self,
        app: App,
        log: EventLog,
        *,
        concurrency: int = 1000,
        lease_ttl_s: float = 15.0,
        drain_timeout_s: float = 30.0,
        worker_id: str | None = None,
        idle_timeout_s: float = 300.0,
        run_timeout_s: float | None = None,
        session_timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        heartbeat_interval_s: float | None = None,
        reclaim_interval_s: float | None = None,
        poll_interval_s: float = 5.0,
        block_ms: int = 1000,
        max_consecutive_failures: int = 5,
        read_batch: int = 256,
        trim_interval_s: float = 30.0,
        max_deliveries: int = 10,
        presence_interval_s: float | None = 0.1,
        tune_gc: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValidationError("concurrency must be >= 1")
        if lease_ttl_s <= 0.1:
            raise ValidationError("lease_ttl_s must be > 0.1")
        self.app = app
        self.log = log
        self.concurrency = concurrency
        self.lease_ttl_s = lease_ttl_s
        self.drain_timeout_s = drain_timeout_s
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.idle_timeout_s = idle_timeout_s
        self.run_timeout_s = run_timeout_s
        self.session_timeout_s = session_timeout_s
        self.retry = retry or RetryPolicy()
        self.heartbeat_interval_s = heartbeat_interval_s or lease_ttl_s / 3
        self.reclaim_interval_s = reclaim_interval_s or lease_ttl_s / 4
        self.block_ms = block_ms
        self.read_batch = read_batch
        self.trim_interval_s = trim_interval_s
        #: a dispatch entry delivered more often than this (every host died with it: a crash
        #: loop) dead-letters its session instead of taking another worker down
        self.max_deliveries = max_deliveries
        self.presence_interval_s = presence_interval_s
        #: while serving, the cyclic GC runs less often (see :func:`_fewer_collections`)
        self.tune_gc = tune_gc
        self.metrics = WorkerMetrics(self.id, concurrency)
        self.supervisor = Supervisor(max_consecutive_failures, self.metrics, self._give_up)
        self._hosts: dict[str, Session] = {}
        self._leases: dict[str, LeaseRec] = {}
        self._lease_lock = threading.Lock()
        self._slots = Slots(concurrency)
        self._backlog: deque[tuple[int, str, Any]] = deque()
        self._draining = False
        self._drain_now = anyio.Event()
        self._stopped = anyio.Event()
        self._running = False
        self._fatal: tuple[str, BaseException] | None = None
        self._tg: TaskGroup | None = None
        self._sessions: TaskSet | None = None
        self.feed = Feed(log, self._hosts, poll_interval_s=poll_interval_s,
                         on_failure=self.supervisor.failed, on_success=self.supervisor.ok,
                         on_rewound=self._rewound)
        self._release: Coalescer | None = None
        self._group: ConsumerGroup | None = None

    # -- lifetime ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop now: running sessions are handed back at once (no drain timeout)."""
        if self._running:
            self.drain(now=True)
            await self._stopped.wait()

    def drain(self, *, now: bool = False) -> None:
        """Stop taking sessions; running ones get ``drain_timeout_s`` to finish, then the rest
        are handed back (``now=True``: at once). :meth:`run` returns when done."""
        self._draining = True
        self._slots.wake()
        for s in list(self._hosts.values()):
            s.wake()  # sessions waiting for input unload now
        if now:
            self._drain_now.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active(self) -> int:
        return self._slots.hosted

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host sessions until drained (:meth:`drain`, SIGTERM in the CLI) or cancelled.
        Raises :class:`WorkerFailed` when the supervisor gives up."""
        await self._serve(False, task_status)

    async def run_burst(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Host sessions until the dispatch streams and the delayed sets are empty and every
        hosted session has ended or unloaded, then return."""
        await self._serve(True, task_status)

    async def _serve(self, burst: bool, task_status: TaskStatus[None]) -> None:
        if self._running:
            raise UsageError("this worker is already running")
        self._running = True
        redis = self.log.redis
        keys = self.log.keys
        self._group = ConsumerGroup(
            ShardStreams(redis, keys.dispatch, keys.all_shards()), keys, GROUP, self.id,
            start_id="0", kind="worker", on_recovered=self._recovered,
            channel=keys.dispatched, doorbell=self.log.settings.cluster_doorbell,
            safety_poll_s=self.log.settings.cluster_safety_poll_s)
        # Redis Cluster: the feed's listener (one connection per master) hears the dispatch
        # channels too, and rings the group's doorbell
        self.feed.bell = self._group.doorbell
        self._release = Coalescer(redis, RELEASE_LUA, lambda shard: (
            [keys.dispatch(shard), keys.delayed(shard), keys.dead(shard)],
            [self.id, GROUP, int(time.time() * 1000)]))
        self._claim_script = redis.register_script(CLAIM_LUA)
        self._delayed_script = redis.register_script(DELAYED_LUA)
        self._requeue_script = redis.register_script(REQUEUE_LUA)
        self._takeover_script = redis.register_script(TAKEOVER_LUA)
        presence = Presence(redis, keys, self.id, interval_s=self.presence_interval_s or 1.0,
                            expiry_s=max(10.0, 3 * self.lease_ttl_s), metrics=self.metrics,
                            take_over=self._take_over)
        heartbeat = Heartbeat(
            redis=redis, keys=keys, worker_id=self.id, lease_ttl_s=self.lease_ttl_s,
            interval_s=self.heartbeat_interval_s, leases=self._lease_snapshot,
            on_lost=self._on_lost, on_fatal=lambda exc: self._give_up("heartbeat", exc),
            status=self._status, metrics=self.metrics, loop=asyncio.get_running_loop(),
            max_failures=self.supervisor.limit,
        )
        # its round trips end with the worker's; the presence connection stays open (this
        # worker alive) until the sessions are handed back
        async with self._release, contextlib.AsyncExitStack() as stack:
            stack.enter_context(_fewer_collections(self.tune_gc))
            if self.presence_interval_s:
                await stack.enter_async_context(presence)
            try:
                await self._group.ensure()
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await tg.start(self.feed.run)
                    heartbeat.start()
                    if self.presence_interval_s:
                        await tg.start(presence.run)
                    tg.start_soon(self._maintain)
                    # a task per hosted session, native (see eventcore._tasks: anyio's
                    # start_soon was a third of the worker's CPU per session)
                    async with TaskSet() as sessions:
                        self._sessions = sessions
                        task_status.started()
                        await self._consume(burst)
                        await self._drain_sessions()
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        if self._hosts:
                            await self._handback(list(self._hosts.values()))
                        if self._backlog:
                            await self._requeue_backlog()
                    except EventcoreError as exc:  # Redis is gone: the leases lapse instead
                        log.warning("worker %s could not hand sessions back: %s", self.id, exc)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(heartbeat.stop)
                    self._running = False
                    self._stopped.set()
        if self._fatal is not None:
            component, cause = self._fatal
            raise WorkerFailed(
                f"worker {self.id}: {component} failed {self.supervisor.limit} times in a row: "
                f"{type(cause).__name__}: {cause}") from cause

    def _give_up(self, component: str, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = (component, exc)
            log.error("worker %s gives up: %s failed %d times in a row", self.id, component,
                      self.supervisor.limit)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _status(self) -> dict[str, Any]:
        return {"active": self._slots.hosted, "max": self.concurrency,
                "load": round(self.metrics.load, 4),
                "state": "draining" if self._draining else "running"}

    async def _recovered(self, shards: list[int]) -> None:
        log.warning("worker %s: the dispatch group was gone on shards %s; recreated",
                    self.id, shards)

    # -- taking sessions -------------------------------------------------------------------------
    async def _consume(self, burst: bool) -> None:
        assert self._group is not None
        group, slots = self._group, self._slots
        while not self._draining:
            free = slots.free
            if free <= 0:
                await slots.wait_until(lambda: slots.free > 0 or self._draining)
                continue
            if self._backlog:
                n = min(free, self.read_batch, len(self._backlog))
                await self._claim_now([self._backlog.popleft() for _ in range(n)])
                continue
            # No slots are reserved while the read blocks: reclaiming (which may take them
            # meanwhile) must not starve behind an idle read. What the read brings beyond the
            # room left when it returns waits in the backlog, claimed in order as slots free.
            want = min(free, self.read_batch)
            try:
                entries = await group.read(group.share(want), 100 if burst else self.block_ms)
                self.supervisor.ok("dispatch")
            except RedisError as exc:
                if not await group.recovered(exc):
                    self.supervisor.failed("dispatch", exc)
                    await anyio.sleep(self.supervisor.backoff_s("dispatch"))
                continue
            room = max(0, min(want, slots.free))
            self._backlog.extend(entries[room:])
            if room and entries:
                await self._claim_now(entries[:room])
            if burst and not entries and await self._burst_done():
                return
        await self._requeue_backlog()

    async def _claim_now(self, entries: Sequence[tuple[int, str, Any]]) -> None:
        """Claim with the slots these entries need reserved until they are hosted."""
        with self._slots.reserve(len(entries)):
            await self._claim(entries, reclaimed=False)

    async def _requeue_backlog(self) -> None:
        """Entries read but never claimed go back to the stream for other workers."""
        by_shard: dict[int, list[str]] = {}
        while self._backlog:
            shard, eid, fields = self._backlog.popleft()
            by_shard.setdefault(shard, []).extend((eid, dispatch_session(fields)))
        for shard, args in by_shard.items():
            with redis_errors("requeue"):
                await run_script(self._requeue_script, [self.log.keys.dispatch(shard)],
                                 [GROUP, self.id, *args])

    async def _burst_done(self) -> bool:
        """Nothing hosted or queued here, no delayed retry left, and no dispatch entry the
        group has not been given: the delayed sets are looked at first, so a retry moved onto
        a dispatch stream after the last (empty) read is seen on the stream."""
        if self._slots.hosted or self._slots.reserved or self._backlog:
            return False
        keys = self.log.keys
        shards = list(keys.all_shards())
        with redis_errors("burst check"):
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.zcard(keys.delayed(shard))
                sizes = await pipe.execute()
            if any(sizes):
                return False
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.xrevrange(keys.dispatch(shard), "+", "-", count=1)
                tails = await pipe.execute()
            with_entries = [(shard, _text(t[0][0])) for shard, t in zip(shards, tails, strict=True)
                            if t]
            if not with_entries:
                return True
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for shard, _ in with_entries:
                    pipe.xinfo_groups(keys.dispatch(shard))
                infos = await pipe.execute()
        for (_, last), groups in zip(with_entries, infos, strict=True):
            delivered = next((_text(g["last-delivered-id"]) for g in groups
                              if _text(g["name"]) == GROUP), "0-0")
            if id_key(last) > id_key(delivered):
                return False  # an entry the group has not been given yet
        return True

    async def _claim(self, entries: Sequence[tuple[int, str, Any]], *, reclaimed: bool,
                     evicted: str = "") -> None:
        """Host ``entries`` (claim.lua); ``evicted``: a worker whose presence connection
        closed (it died), whose leases do not hold its sessions."""
        by_shard: dict[int, list[tuple[str, str]]] = {}
        unacked: list[tuple[int, str, Any]] = []  # entries of claims no replica confirmed
        for shard, eid, fields in entries:
            sid = dispatch_session(fields)
            try:
                validate_session_id(sid)
            except ValidationError:
                log.error("dispatch entry %s holds no valid session id: %r", eid, fields)
                await self._ack_malformed(shard, eid)
                continue
            if self.log.keys.shard_of(sid) != shard:
                # append.lua writes a session's dispatch entry on the session's own shard only:
                # this one was planted (claiming it would mix two shards' keys in one script:
                # CROSSSLOT on a cluster, the wrong feed on one node)
                log.error("dispatch entry %s of shard %d names session %r of shard %d", eid,
                          shard, sid, self.log.keys.shard_of(sid))
                await self._ack_malformed(shard, eid)
                continue
            by_shard.setdefault(shard, []).append((sid, eid))

        lk = self.log.keys
        replicated = self.log.appender.replicated

        def call(shard: int, items: list[tuple[str, str]]) -> tuple[list[Any], list[Any]]:
            keys = [lk.dispatch(shard), lk.dead(shard), lk.feed(shard)]
            args: list[Any] = [self.id, int(self.lease_ttl_s * 1000), GROUP,
                               self.max_deliveries, int(time.time() * 1000), lk.notify(shard),
                               b"", evicted]
            session_keys = self.log.appender.session_keys  # (cached: _start takes them too)
            for sid, eid in items:
                sk = session_keys(sid)
                keys += (sk.meta, sk.lease, sk.stream, sk.dedupe)
                head, args[6] = session_started_parts(sid)  # (the tail is the same for all)
                args += (eid, sid, head)
            return keys, args

        def hosted(shard: int, items: list[tuple[str, str]], claims: Sequence[Claim]) -> None:
            for (sid, eid), claim in zip(items, claims, strict=True):
                if claim.verdict == "ok":
                    self._start(shard, sid, eid, claim, reclaimed)
                elif claim.verdict == "corrupt":
                    log.error("dispatch entry %s of session %r: %s", eid, sid, claim.detail)

        async def one(shard: int, items: list[tuple[str, str]]) -> None:
            keys, args = call(shard, items)
            with redis_errors("claim"):
                results, confirmed = await replicated.run(self._claim_script, keys, args)
            claims = [decode_claim(res) for res in results]
            if any(c.verdict == "ok" for c in claims):
                try:
                    replicated.check(confirmed, claims, what="claim")
                except AppendNotReplicated:
                    # EVENTCORE_APPEND_REPLICAS: a claim is acknowledged only once replicated
                    # (a failover could lose its lease, epoch and session.started): host none
                    # of them now. They are still pending to this worker: claimed again from
                    # the backlog (for their holder claim.lua is idempotent: session.started
                    # is found by its event key), not via XAUTOCLAIM (it counts deliveries)
                    mine = {eid for _, eid in items}
                    unacked.extend(e for e in entries if e[0] == shard and e[1] in mine)
                    raise
            hosted(shard, items, claims)

        if len(by_shard) > 1 and not replicated.replicas and not is_cluster(self.log.redis):
            # every shard's claim in one round trip (no WAIT to follow each on its connection)
            calls = list(by_shard.items())
            try:
                with redis_errors("claim"):
                    async with self.log.redis.pipeline(transaction=False) as pipe:
                        sha = self._claim_script.sha
                        for shard, items in calls:
                            keys, args = call(shard, items)
                            # (EVALSHA as such: a pipeline of registered scripts asks SCRIPT
                            # EXISTS first, a round trip more; NOSCRIPT falls back below)
                            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                        replies = await pipe.execute()
            except RedisUnavailable as exc:
                # unclaimed entries stay pending and are reclaimed after the lease TTL
                self.supervisor.failed("dispatch", exc)
                return
            except EventcoreError:
                # one shard's script failed, or the script is not loaded (NOSCRIPT): each
                # shard on its own below (reloading it), so one shard's trouble holds up no
                # other (for their holder the claims that did run are idempotent: a new epoch,
                # session.started found by its event key)
                pass
            else:
                for (shard, items), results in zip(calls, replies, strict=True):
                    hosted(shard, items, [decode_claim(res) for res in results])
                return

        try:
            async with anyio.create_task_group() as tg:
                for shard, items in by_shard.items():
                    tg.start_soon(one, shard, items)
        except* AppendNotReplicated as group:
            # not a failure of this worker (a replica is down or behind: appends are refused
            # too until it is back): wait, then claim them again
            log.warning("worker %s: %s", self.id, group.exceptions[0])
            self.metrics.claims_not_replicated += len(group.exceptions)
            self._backlog.extendleft(reversed(unacked))
            await anyio.sleep(self.supervisor.backoff_s("dispatch"))
        except* EventcoreError as group:
            # unclaimed entries stay pending and are reclaimed after the lease TTL
            self.supervisor.failed("dispatch", group.exceptions[0])

    async def _ack_malformed(self, shard: int, eid: str) -> None:
        assert self._group is not None
        await self._group.ack({shard: [eid]})

    def _start(self, shard: int, sid: str, eid: str, claim: Claim, reclaimed: bool) -> None:
        epoch, agent, attempt = claim.epoch, claim.agent, claim.attempt
        spec = self.app.get(agent) or AgentSpec(agent, _no_handler)
        old = self._hosts.get(sid)
        if old is not None:  # our own entry came back to us: that hosting is superseded
            old._stop("lost")
        deadline = math.inf
        session_timeout = spec.session_timeout_s or self.session_timeout_s
        if session_timeout and claim.created_at_ms is not None:
            left = claim.created_at_ms / 1000 + session_timeout - time.time()
            deadline = anyio.current_time() + left
        s = Session(self, sid, spec, epoch=epoch, attempt=attempt, entry_id=eid, shard=shard,
                    labels=claim.labels, deadline=deadline,
                    run_timeout_s=spec.run_timeout_s or self.run_timeout_s,
                    idle_timeout_s=spec.idle_timeout_s or self.idle_timeout_s)
        self._hosts[sid] = s
        with self._lease_lock:
            sk = self.log.appender.session_keys(sid)
            self._leases[sid] = LeaseRec(sid, shard, epoch, eid, sk.meta, sk.lease)
        self._slots.host()
        self.metrics.active = self._slots.hosted
        self.metrics.claims += 1
        if reclaimed:
            self.metrics.reclaims += 1
        assert self._sessions is not None
        # the claim recorded session.started (> 0: its seq, own: not read back) or found an
        # earlier hosting's (< 0); 0: the handler's task appends it
        started = claim.started
        if started > 0:
            s._own_seq(started)
        s.checkpoint_seq = claim.checkpoint_seq
        # a brand-new session's stream held only session.created: skip reading it back
        fresh = old is None and not claim.dead and claim.last_seq == 1
        if fresh:
            self.feed.adopt(s, 1)
        self._sessions.start_soon(self._host, s, claim.dead, claim.error, fresh, started != 0)

    async def _host(self, s: Session, dead: bool, error: str, fresh: bool, started: bool
                    ) -> None:
        try:
            await settle(self, s, dead, error, fresh=fresh, started=started)
        except anyio.get_cancelled_exc_class():
            raise  # the worker is stopping: run()'s finally hands the session back
        except Exception as exc:
            # our machinery (not the handler) failed, e.g. Redis stayed down: the lease lapses
            # and another worker (or this one) takes the session over
            log.exception("session %s: hosting failed", s.id)
            self.supervisor.failed("session", exc)
            self._forget(s)
        else:
            self.supervisor.ok("session")
            self._forget(s)
        finally:
            self._slots.release()
            self.metrics.active = self._slots.hosted

    # -- what sessions call back -------------------------------------------------------------
    async def unload(self, s: Session) -> None:
        res = await self.release_unload(s)
        if res == "ok":
            self._forget(s)
            self.metrics.unloaded += 1
            s._stop("unload")
        elif res == "busy":
            self.feed.mark(s)
        else:
            self.fenced(s)

    def written(self, s: Session) -> None:
        # a read deferred while the session's own appends were in flight is due now
        if (s.refetch or s.known > s.cursor) and self._hosts.get(s.id) is s:
            self.feed.mark(s, s.known)

    def fenced(self, s: Session) -> None:
        if s.stop_reason != "lost":
            self.metrics.fenced_writes += 1
            self.metrics.lost += 1
        self._forget(s)
        s._stop("lost")

    async def release_ack(self, s: Session) -> str:
        """The session ended: acknowledge its dispatch entry, drop the lease."""
        return await self._release_one(s, "ack")

    async def release_unload(self, s: Session) -> str:
        """Idle: unload unless its seq moved past the host's read cursor (then ``busy``)."""
        return await self._release_one(s, "unload", s.cursor)

    async def release_retry(self, s: Session, *, due_ms: int, attempt: int) -> str:
        """Host attempt ``attempt`` again at ``due_ms`` (through the delayed set)."""
        return await self._release_one(s, "retry", due_ms, attempt)

    async def release_dead(self, s: Session, *, error_json: str) -> str:
        """Dead-letter the session once (its end is recorded, then :meth:`release_ack`)."""
        return await self._release_one(s, "dead", error_json, s.agent)

    async def _release_one(self, s: Session, mode: str, a: Any = "", b: Any = "") -> str:
        assert self._release is not None
        sk = self.log.keys.session(s.id)
        with self.releasing(s) as released:
            res = _text(await self._release.call(
                s.shard, (sk.meta, sk.lease), release_item(mode, s.id, s.epoch, s.entry_id, a, b)))
            released(res != "busy")
        return res

    @contextlib.contextmanager
    def releasing(self, s: Session) -> Iterator[Callable[[bool], None]]:
        """Around a script that may release the session's hosting: its lease is not renewed
        meanwhile (a heartbeat racing the script would see the lease gone and report the
        session lost), and renewed again after, unless ``released(True)`` was called."""
        with self._lease_lock:
            rec = self._leases.pop(s.id, None)
        done = False

        def released(ok: bool) -> None:
            nonlocal done
            done = ok

        try:
            yield released
        finally:
            if rec is not None and not done and self._hosts.get(s.id) is s:
                with self._lease_lock:
                    self._leases.setdefault(s.id, rec)

    def _forget(self, s: Session) -> None:
        if self._hosts.get(s.id) is s:
            del self._hosts[s.id]
        with self._lease_lock:
            rec = self._leases.get(s.id)
            if rec is not None and rec.epoch == s.epoch:
                del self._leases[s.id]

    def _lease_snapshot(self) -> list[LeaseRec]:
        with self._lease_lock:
            return list(self._leases.values())

    def _on_lost(self, recs: list[LeaseRec]) -> None:
        for rec in recs:
            s = self._hosts.get(rec.session_id)
            with self._lease_lock:
                renewing = self._leases.get(rec.session_id) == rec
            if s is not None and s.epoch == rec.epoch and renewing:
                self.metrics.lost += 1
                self._forget(s)
                s._stop("lost")

    # -- drain -------------------------------------------------------------------------------
    async def _drain_sessions(self) -> None:
        slots = self._slots
        if slots.hosted:
            log.info("worker %s draining %d sessions (up to %.1f s)", self.id, slots.hosted,
                     self.drain_timeout_s)
            with anyio.move_on_after(self.drain_timeout_s):
                async with anyio.create_task_group() as tg:
                    async def now() -> None:
                        await self._drain_now.wait()
                        tg.cancel_scope.cancel()
                    tg.start_soon(now)
                    await slots.wait_until(lambda: slots.hosted == 0)
                    tg.cancel_scope.cancel()
        if self._hosts:
            await self._handback(list(self._hosts.values()))

    async def _rewound(self, sessions: list[Session]) -> None:
        """Redis lost history these hostings had read (it restarted without its latest
        writes): each is handed back, and hosted again from its log as it now is (the
        handler runs again from the start, as after any re-host)."""
        for s in sessions:
            log.warning("session %s: its stream went back below seq %d (Redis lost writes); "
                        "hosting it again", s.id, s.cursor)
        await self._handback(sessions)

    async def _handback(self, sessions: list[Session]) -> None:
        """Re-dispatch and acknowledge in one script per shard, so another worker takes the
        sessions at once instead of after the lease TTL."""
        assert self._release is not None
        by_shard: dict[int, list[Session]] = {}
        for s in sessions:
            s._stop("handback")
            self._forget(s)
            by_shard.setdefault(s.shard, []).append(s)
        for shard, group in by_shard.items():
            items = []
            for s in group:
                sk = self.log.keys.session(s.id)
                items.append(((sk.meta, sk.lease),
                              release_item("handback", s.id, s.epoch, s.entry_id)))
            results = await self._release.run_batch(shard, items)
            self.metrics.handed_back += sum(1 for r in results if _text(r) == "ok")

    # -- background: retries due, reclaiming from dead workers ---------------------------------
    async def _maintain(self) -> None:
        tick = min(0.25, self.reclaim_interval_s)
        next_reclaim = anyio.current_time() + self.reclaim_interval_s
        next_trim = anyio.current_time() + self.trim_interval_s
        while True:
            await anyio.sleep(tick)
            try:
                await self._move_delayed()
                if anyio.current_time() >= next_trim:
                    next_trim = anyio.current_time() + self.trim_interval_s
                    await self._trim()
                if self._backlog and self._slots.free <= 0:
                    # full: let other workers have what we read beyond our share
                    await self._requeue_backlog()
                if anyio.current_time() >= next_reclaim and not self._draining:
                    next_reclaim = anyio.current_time() + self.reclaim_interval_s
                    await self._reclaim()
                self.supervisor.ok("maintenance")
            except EventcoreError as exc:
                self.supervisor.failed("maintenance", exc)

    async def _trim(self) -> None:
        """Drop dispatch entries that are delivered and acknowledged: below every group's
        last-delivered id and oldest pending entry (exact MINID: never an unacknowledged or
        undelivered entry)."""
        assert self._group is not None
        await self._group.trim()

    async def _move_delayed(self) -> None:
        keys = self.log.keys
        now = int(time.time() * 1000)
        with redis_errors("delayed"):
            for shard in keys.all_shards():
                await run_script(self._delayed_script, [keys.delayed(shard), keys.dispatch(shard)],
                                 [now, 100])

    async def _reclaim(self) -> None:
        """Take over dispatch entries nobody has renewed for a lease TTL (their worker died
        or stalled). XAUTOCLAIM scans the pending list a window at a time: follow its cursor
        round the whole list, as long as this worker has room. Unfenced: claim.lua's leases
        and epochs decide who hosts, and it judges the delivery counts (dead letters)."""
        assert self._group is not None
        group, slots = self._group, self._slots
        for shard in self.log.keys.all_shards():
            start = "0-0"
            while (free := min(slots.free, 100)) > 0:
                with slots.reserve(free):
                    step = await group.reclaim(
                        shard, cursor=start, min_idle_ms=int(self.lease_ttl_s * 1000),
                        count=free)
                    entries = [(shard, c.entry_id, c.fields) for c in step.claimed]
                    alive = [e for e in entries if self._hosting(e)]
                    if alive:
                        # sessions hosted here (their heartbeat came late, or they were
                        # claimed long after they were read): alive, so nothing is taken
                        # over, and the delivery XAUTOCLAIM counted is taken back (only
                        # hostings that died count towards the crash-loop limit)
                        await group.touch({shard: [eid for _, eid, _ in alive]}, uncount=True)
                        entries = [e for e in entries if not self._hosting(e)]
                    if entries:
                        await self._claim(entries, reclaimed=True)
                start = step.cursor
                if start in ("0-0", "0"):
                    break
            if slots.free <= 0:
                return

    async def _take_over(self, host: str) -> bool:
        """Host what the evicted worker ``host`` (its process died, see
        :mod:`workers._presence`) still has pending, as far as this worker has room, at once
        instead of after its leases lapse. True when nothing of it was left on any shard.

        All shards at once (a shard at a time, the sessions claimed first would replay their
        history while the later shards wait): one pipelined look at what is pending to it,
        the room shared out, one pipelined takeover.lua, then one claim per shard."""
        if self._draining or self._slots.free <= 0:
            return False
        keys, slots = self.log.keys, self._slots
        shards = list(keys.all_shards())
        with redis_errors("takeover"):
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.xpending_range(keys.dispatch(shard), GROUP, "-", "+", slots.free, host)
                pending = await pipe.execute()
        room, calls = slots.free, []
        for shard, entries in zip(shards, pending, strict=True):
            if entries and room > 0:
                calls.append((shard, min(room, len(entries))))
                room -= calls[-1][1]
        taking = sum(take for _, take in calls)
        left = sum(len(e) for e in pending) > taking
        if not calls:
            return not left
        with slots.reserve(taking):  # the slots the claims need, as the other paths do
            with redis_errors("takeover"):
                replies = await run_scripts(self.log.redis, self._takeover_script, [
                    ([keys.dispatch(shard)], [GROUP, host, self.id, take])
                    for shard, take in calls])
            # XCLAIM answers nil for an entry no longer in the stream (it dropped it)
            claimed = [(shard, _text(e[0]), {e[1][i]: e[1][i + 1]
                                            for i in range(0, len(e[1]), 2)})
                       for (shard, _), res in zip(calls, replies, strict=True)
                       for e in res if e and e[1]]
            if claimed:
                self.metrics.takeovers += len(claimed)
                await self._claim(claimed, reclaimed=True, evicted=host)
        return not left

    def _hosting(self, entry: tuple[int, str, Any]) -> bool:
        shard, eid, fields = entry
        s = self._hosts.get(dispatch_session(fields))
        return s is not None and (s.shard, s.entry_id) == (shard, eid)
