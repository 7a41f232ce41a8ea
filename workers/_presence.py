"""Presence: fast takeover of a dead worker's sessions, without waiting for their leases.

A worker process that dies (SIGKILL, a crash, OOM) has its sockets closed by the kernel, and
Redis drops its clients at once. Each worker holds one *presence connection* of its own (used
only for short commands: never a blocking read) and registers that connection's ``CLIENT ID``
in the presence registry (:meth:`eventcore.Keys.presence`). Every worker checks, every
``interval_s``, which registered connections are gone (one ``CLIENT LIST ID ...``), marks such
a worker *evicted* (presence.lua, a compare-and-set on the registration it saw) and takes its
pending dispatch entries over (takeover.lua, then claim.lua told the evicted id, which bumps
each session's epoch: whatever the old host still writes is refused as StaleHost).

What it never evicts on:

* a stopped or partitioned host (SIGSTOP, a network partition): its connection stays open in
  Redis, so its sessions wait for their leases as before;
* the checker's own trouble: any error of the check (a reply that is an error, a lost
  connection, a timeout) skips the round, nothing is evicted;
* a registration made against another Redis server (a failover or restart since: client ids
  are per server process) or through a connection that was re-established since the checker
  read the registry (``CLIENT ID`` is re-read in each round trip).

On Redis Cluster the registry is one key in one slot, and each worker's presence connection
goes to the master serving that slot: liveness is about the process, not about shards, and
the takeover itself is fenced per session by claim.lua on each shard's master. Should that slot
move, registrations name the old master's run id and nobody is evicted (leases decide) until
the workers re-register through the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskStatus
from redis import exceptions as rexc
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.retry import Retry

from eventcore import Keys
from eventcore._redis import Redis, is_cluster
from eventcore._redis import text as _text
from eventcore.errors import EventcoreError

from ._metrics import WorkerMetrics
from ._scripts import load_script

__all__ = ["Presence"]

log = logging.getLogger("workers")
PRESENCE_LUA = load_script("presence")
ALIVE, EVICTED = "alive", "evicted"


@dataclass(frozen=True, slots=True)
class Registration:
    """One field of the presence registry, parsed (``raw`` is the value as stored)."""

    worker_id: str
    raw: str
    run_id: str
    client_id: int
    server: str
    expires_ms: int
    state: str

    @classmethod
    def parse(cls, worker_id: str, raw: str) -> Registration | None:
        parts = raw.split(" ")
        if len(parts) != 5 or not parts[1].isdigit() or not parts[3].isdigit():
            return None
        return cls(worker_id, raw, parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4])

    def evicted(self) -> str:
        return " ".join((self.run_id, str(self.client_id), self.server, str(self.expires_ms),
                         EVICTED))


class Presence:
    """The worker's presence connection and the check of everyone else's.

    ``async with presence:`` connects and registers (best effort: a failure is retried by
    :meth:`run`), and leaving it removes the registration, then closes the connection (a clean
    stop is not a death). :meth:`run` checks every ``interval_s`` and calls ``take_over(id)``
    for each evicted worker; it returns True when nothing of that worker was left pending."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        worker_id: str,
        *,
        interval_s: float,
        expiry_s: float,
        metrics: WorkerMetrics,
        take_over: Callable[[str], Awaitable[bool]],
    ) -> None:
        self._redis = redis
        self._key = keys.presence()
        self._id = worker_id
        self.run_id = uuid.uuid4().hex
        self._interval_s = interval_s
        self._expiry_ms = int(expiry_s * 1000)
        self._metrics = metrics
        self._take_over = take_over
        self._conn: AbstractConnection | None = None
        self._dirty = False  # a round trip on the connection was interrupted
        #: what the registry names for this worker now (None: not registered)
        self.client_id: int | None = None
        self._server = ""
        self._refresh_at = 0.0

    # -- lifetime ------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self._register()
        except (rexc.RedisError, OSError) as exc:
            log.warning("worker %s: presence not registered yet: %s", self._id, exc)
            await self._drop()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # leave through the registered connection (closing it first would let a checker see
        # this worker "dead" for a moment), unless a cancelled check left it mid-reply
        if self._dirty:
            await self._drop()
        # on failure the registration expires, and checkers drop it
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), \
                contextlib.suppress(rexc.RedisError, OSError):
            await self._eval("leave", self._id, self.run_id)
        await self._drop()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self._round()
            except (rexc.RedisError, OSError, EventcoreError) as exc:
                # the checker's own trouble says nothing about anyone else: no eviction
                self._metrics.presence_errors += 1
                log.debug("worker %s: presence check failed: %s", self._id, exc)
                if isinstance(exc, (rexc.RedisError, OSError)) and not isinstance(
                        exc, rexc.ResponseError):
                    await self._drop()  # connect (and register) afresh next round
            await anyio.sleep(self._interval_s)

    # -- the connection --------------------------------------------------------------------------
    def _connection(self) -> AbstractConnection:
        """A connection of its own (no pool: it must stay the one registered) to the server
        holding the registry key; no retries (a failure skips a round instead)."""
        if is_cluster(self._redis):
            node = self._redis.get_node_from_key(self._key)  # type: ignore[attr-defined]
            cls, kwargs = node.connection_class, dict(node.connection_kwargs)
        else:
            pool = self._redis.connection_pool
            cls, kwargs = pool.connection_class, dict(pool.connection_kwargs)
        kwargs.update(retry=Retry(NoBackoff(), 0), retry_on_error=[], socket_timeout=5.0)
        conn: AbstractConnection = cls(**kwargs)
        return conn

    async def _drop(self) -> None:
        conn, self._conn, self.client_id, self._dirty = self._conn, None, None, False
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.disconnect()

    async def _trip(self, *commands: tuple[Any, ...]) -> list[Any]:
        """One round trip on the presence connection; an error reply is raised after every
        reply is read (the connection stays in step)."""
        if self._conn is None:
            self._conn = self._connection()
        conn = self._conn
        self._dirty = True
        await conn.send_packed_command(conn.pack_commands(commands))
        out: list[Any] = []
        error: rexc.ResponseError | None = None
        for _ in commands:
            try:
                out.append(await conn.read_response())
            except rexc.ResponseError as exc:
                error = error or exc
                out.append(None)
        self._dirty = False
        if error is not None:
            raise error
        return out

    async def _eval(self, mode: str, worker_id: str, *args: Any) -> int:
        (done,) = await self._trip(("EVAL", PRESENCE_LUA, 1, self._key, mode, worker_id, *args))
        return int(done)

    async def _register(self) -> None:
        """(Re-)register this worker with the connection's client id and the server's run id
        (a new connection, or the refresh that keeps the registration from expiring)."""
        client_id, info = await self._trip(("CLIENT", "ID"), ("INFO", "server"))
        server = next((line.partition(":")[2].strip() for line in _text(info).splitlines()
                       if line.startswith("run_id:")), "")
        if not server:
            raise rexc.ResponseError("INFO server names no run_id")
        expires = int(time.time() * 1000) + self._expiry_ms
        await self._eval("register", self._id,
                         f"{self.run_id} {int(client_id)} {server} {expires} {ALIVE}")
        self.client_id, self._server = int(client_id), server
        self._refresh_at = anyio.current_time() + self._expiry_ms / 5000

    # -- the check -----------------------------------------------------------------------------
    async def _round(self) -> None:
        if self._conn is None or self.client_id is None:
            await self._register()
        client_id, fields = await self._trip(("CLIENT", "ID"), ("HGETALL", self._key))
        if int(client_id) != self.client_id:
            await self._register()  # the connection was re-established: what it reads next
            return                  # round is judged from the new registration
        if anyio.current_time() >= self._refresh_at:
            await self._register()
        now = int(time.time() * 1000)
        regs: list[Registration] = []
        flat = list(fields.items()) if isinstance(fields, dict) else list(
            zip(fields[::2], fields[1::2], strict=True))
        for wid, raw in flat:
            reg = Registration.parse(_text(wid), _text(raw))
            if reg is not None and reg.worker_id != self._id:
                regs.append(reg)
        for reg in regs:
            if reg.expires_ms <= now:  # its worker stopped refreshing it long ago
                await self._eval("forget", reg.worker_id, reg.raw)
        regs = [r for r in regs if r.expires_ms > now]
        suspects = [r for r in regs if r.state == ALIVE and r.server == self._server]
        evicted = [r for r in regs if r.state == EVICTED]
        if suspects:
            ids = sorted({r.client_id for r in suspects})
            client_id, listing = await self._trip(("CLIENT", "ID"),
                                                  ("CLIENT", "LIST", "ID", *ids))
            if int(client_id) != self.client_id:
                return  # another server may have answered: judge nothing this round
            present = {int(f[3:]) for line in _text(listing).splitlines()
                       for f in line.split(" ")[:1] if f.startswith("id=") and f[3:].isdigit()}
            for reg in suspects:
                if reg.client_id in present:
                    continue
                if await self._eval("evict", reg.worker_id, reg.raw, reg.evicted()):
                    self._metrics.evictions += 1
                    log.warning("worker %s: worker %s's connection closed (it died): taking "
                                "its sessions over", self._id, reg.worker_id)
                    evicted.append(dataclasses.replace(reg, raw=reg.evicted(), state=EVICTED))
        self._metrics.presence_checks += 1
        for reg in evicted:
            if await self._take_over(reg.worker_id):
                await self._eval("forget", reg.worker_id, reg.raw)  # nothing of it left anywhere
