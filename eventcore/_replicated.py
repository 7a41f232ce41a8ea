"""Replicated acknowledgement (``EVENTCORE_APPEND_REPLICAS=N``): run a script, then ``WAIT N``
on the same connection, so the caller learns how many replicas have what the script wrote.

``WAIT`` counts the replicas that acknowledged every write made *on its connection* so far: it
must follow the script on the connection that ran it, to the master that ran it. redis-py's
cluster client would send ``WAIT`` (which has no key) to any node, so on a cluster the script
and its ``WAIT`` go out together on a connection of the master serving the script's first key.

Every script whose writes are acknowledged to a caller, or that a later step relies on (the
appender's batches, a worker's claim with its ``session.started``, a schedule firing, a
session's deletion, an effect's claim), runs through :meth:`Replicated.run` and checks what
``WAIT`` counted with :meth:`Replicated.check`: one mechanism, one place that knows the wire
details. Resending is left to the callers' scripts being safe to run twice (batch tokens, event
key dedupe, fencing): the cluster path retries failover, MOVED/ASK and NOSCRIPT within the
retry budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis import exceptions as rexc
from redis.exceptions import NoScriptError

from ._redis import _SCRIPT_LOADS, Redis, _Budget, _transient, is_cluster, run_script
from .errors import AppendNotReplicated, CorruptEntry

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection as Connection
    from redis.commands.core import AsyncScript

__all__ = ["Replicated"]


class Replicated:
    """Scripts run on ``redis`` with ``replicas`` replicas' confirmation (0: none asked, the
    script runs as :func:`~eventcore._redis.run_script` runs it)."""

    def __init__(self, redis: Redis, *, replicas: int = 0, timeout_ms: int = 1000,
                 retry_budget_s: float = 15.0) -> None:
        self.redis = redis
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.retry_budget_s = retry_budget_s

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any], *,
                  conn: Connection | None = None) -> tuple[Any, int | None]:
        """Run ``script`` on the master of ``keys[0]`` and, when replicas are asked for,
        ``WAIT`` after it. Returns the script's reply and the replicas ``WAIT`` counted (None
        when none were asked). ``conn``: a single node's connection of the caller's own to run
        it on (the appender's); otherwise one is checked out of the pool for the two commands.
        """
        redis: Any = self.redis
        if is_cluster(redis):
            if self.replicas:
                return await self._cluster(script, keys[0], keys, args)
            # the cluster client routes by the first key, follows MOVED/ASK, reloads on
            # NOSCRIPT on every master
            return await run_script(script, keys, args), None
        if conn is not None:
            return await self._on(conn, script, keys, args)
        if not self.replicas:
            return await run_script(script, keys, args), None
        pool = redis.connection_pool
        own: Connection = await pool.get_connection()
        try:
            return await self._on(own, script, keys, args)
        finally:
            await pool.release(own)

    def check(self, replicated: int | None, results: Sequence[Any] = (), *,
              what: str = "append") -> None:
        """Raise :class:`AppendNotReplicated` when ``WAIT`` counted fewer replicas than asked:
        what the script wrote is on the master but not acknowledged (a failover may lose it).
        Callers skip this when the script wrote nothing."""
        if replicated is not None and replicated < self.replicas:
            raise AppendNotReplicated(self.replicas, replicated, self.timeout_ms, results,
                                      what=what)

    async def _eval_wait(self, conn: Connection, script: AsyncScript, keys: Sequence[Any],
                         args: Sequence[Any]) -> tuple[Any, int | None]:
        """EVALSHA on ``conn`` and, with replicas asked for, ``WAIT`` in the same write: both
        replies are read (an error reply of the script is raised after), so the connection
        stays in step."""
        if not self.replicas:
            await conn.send_command(
                "EVALSHA", script.sha, len(keys), *keys, *args, check_health=False
            )
            return await conn.read_response(), None
        await conn.send_packed_command(conn.pack_commands([
            ("EVALSHA", script.sha, len(keys), *keys, *args),
            ("WAIT", self.replicas, self.timeout_ms),
        ]), False)
        timeout = self.timeout_ms / 1000 + 10
        error: rexc.ResponseError | None = None
        try:
            raw = await conn.read_response(timeout=timeout)
        except rexc.ResponseError as exc:
            error, raw = exc, None
        replicas = await conn.read_response(timeout=timeout)
        if error is not None:
            raise error
        return raw, int(replicas)

    async def _cluster(self, script: AsyncScript, route_key: Any, keys: Sequence[Any],
                       args: Sequence[Any]) -> tuple[Any, int | None]:
        """The script and its WAIT on one connection of the master serving ``route_key``'s
        slot. Failover, MOVED/ASK and NOSCRIPT are retried within the retry budget."""
        client: Any = self.redis
        slot = client.keyslot(route_key)
        budget: _Budget | None = None
        while True:
            try:
                if client._initialize:
                    await client.initialize()
                node = client.nodes_manager.get_node_from_slot(slot)
                conn = node.acquire_connection()
                try:
                    return await self._eval_wait(conn, script, keys, args)
                except BaseException:
                    await conn.disconnect()  # a reply may still be on the wire
                    raise
                finally:
                    node._free.append(conn)
            except NoScriptError:
                script.sha = await client.script_load(script.script)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if not isinstance(exc, rexc.MaxConnectionsError):
                    await client.aclose()  # read the slot map again on the next try
                budget = budget or _Budget(self.retry_budget_s)
                await budget.wait(exc)

    async def _on(self, conn: Connection, script: AsyncScript, keys: Sequence[Any],
                  args: Sequence[Any]) -> tuple[Any, int | None]:
        """EVALSHA (and WAIT) on a single node's ``conn``, loading the script on NOSCRIPT.
        Transient errors are retried with the client's policy."""

        async def once() -> tuple[Any, int | None]:
            return await self._eval_wait(conn, script, keys, args)

        async def fail(error: BaseException) -> None:
            await conn.disconnect()

        for _ in range(_SCRIPT_LOADS):
            try:
                return await conn.retry.call_with_retry(once, fail)
            except NoScriptError:
                # the server lost its script cache (restart, SCRIPT FLUSH): nothing ran. Around
                # a restart the load may reach the stopping server: so try a few times
                script.sha = await self.redis.script_load(script.script)
            except BaseException:
                # cancelled or failed mid-command: the reply may still be on the wire
                await conn.disconnect()
                raise
        raise CorruptEntry("a script kept vanishing while it was being loaded")
