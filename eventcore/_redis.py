"""Connecting to Redis, retrying transient errors, and converting redis-py errors at the edge."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.client import EMPTY_RESPONSE, NEVER_DECODE

from ._cluster_node import AnyNodeCommands, LeakFreeNode, RedirectSafeNodes, Seeds, adopt
from ._scripts import sharded
from .errors import ConfigError, CorruptEntry, RedisError, RedisUnavailable

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

_hiredis: Any
try:
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    _hiredis = None

__all__ = [
    "Redis",
    "RedisMode",
    "connect_cluster",
    "connect_redis",
    "is_cluster",
    "open_redis",
    "redis_errors",
    "run_script",
    "run_scripts",
    "text",
]

Redis = aioredis.Redis
RedisMode = Literal["auto", "single", "cluster"]

_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0


def _retries_for(budget_s: float) -> int:
    """How many retries of exponential backoff (base 50 ms, cap 1 s) fit in ``budget_s``."""
    spent, retries, delay = 0.0, 0, _BACKOFF_BASE
    while spent < budget_s:
        spent += min(delay, _BACKOFF_CAP)
        delay *= 2
        retries += 1
    return max(1, retries)


def connect_redis(
    url: str, *, retry_budget_s: float = 15.0, max_connections: int = 64, **kwargs: Any
) -> Redis:
    """A client whose commands retry connection errors, timeouts and LOADING for a bounded time.

    Retrying an append is safe because every append carries an event key (dedupe in Lua).
    """
    retry = Retry(ExponentialWithJitterBackoff(base=_BACKOFF_BASE, cap=_BACKOFF_CAP),
                  _retries_for(retry_budget_s))
    pool = _RetryingPool.from_url(
        url,
        max_connections=max_connections,
        timeout=math.inf if retry_budget_s <= 0 else retry_budget_s,
        retry=retry,
        retry_on_error=[rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError],
        socket_connect_timeout=5,
        health_check_interval=30,
        **({} if url.startswith("unix://") else {"socket_keepalive": True}),
        **kwargs,
    )
    pool.connection_class = _fast_packing(pool.connection_class)
    return aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool


class _RetryingPool(aioredis.BlockingConnectionPool):
    """Checking a connection out may reconnect (after a dropped connection or a restart), and
    redis-py does that outside its command retry: a connection killed during the handshake would
    fail the command at once. Here the checkout is retried with the same policy."""

    async def ensure_connection(self, connection: Any) -> None:
        ensure = super().ensure_connection

        async def fail(error: BaseException) -> None:
            await connection.disconnect()

        await connection.retry.call_with_retry(lambda: ensure(connection), fail)


_FAST: dict[type[Any], type[Any]] = {}


def _fast_packing(cls: type[Any]) -> type[Any]:
    """The connection class with commands packed by hiredis (C) instead of redis-py's Python
    packer, which costs ~1 us per argument: an append batch has 9 per event.

    redis-py's synchronous client does this when hiredis is installed; its asyncio one does not.
    """
    if _hiredis is None:
        return cls
    fast = _FAST.get(cls)
    if fast is None:
        pack = _hiredis.pack_command

        def pack_command(self: Any, *args: Any) -> list[bytes]:
            # as redis-py's packers: a command name may carry words ('CONFIG GET')
            first = args[0]
            if isinstance(first, str):
                args = (*first.encode().split(), *args[1:])
            elif b" " in first:
                args = (*first.split(), *args[1:])
            try:
                return [pack(args)]
            except TypeError as exc:
                raise rexc.DataError(str(exc)) from exc

        fast = _FAST[cls] = type(cls.__name__, (cls,), {"pack_command": pack_command})
    return fast


_SCRIPT_LOADS = 5


async def run_script(script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run a registered script, loading it again as often as the server forgot it.

    redis-py reloads once; around a restart the load can land on the stopping server and the
    retry on the new one, which has an empty script cache. NOSCRIPT means nothing ran, so
    trying again is always safe.
    """
    for _ in range(_SCRIPT_LOADS - 1):
        try:
            return await script(keys=keys, args=args)
        except rexc.ResponseError as exc:
            if not _noscript(exc):
                raise
    return await script(keys=keys, args=args)


def _noscript(exc: rexc.ResponseError) -> bool:
    """NOSCRIPT, whether redis-py parsed it (:class:`NoScriptError`) or a pipeline passed it on
    as a plain ``ResponseError`` naming the pipelined command ("... caused error: NOSCRIPT")."""
    return isinstance(exc, rexc.NoScriptError) or "No matching script" in str(exc)


async def run_scripts(
    client: Redis, script: AsyncScript, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
) -> list[Any]:
    """Many calls ``(keys, args)`` of one registered script in one round trip, with
    :func:`run_script`'s reloading. The whole batch is sent again after NOSCRIPT (or a dropped
    connection): only for scripts that may run twice."""
    for attempt in range(_SCRIPT_LOADS):
        try:
            async with client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    if is_cluster(client):  # a cluster pipeline refuses pipe.evalsha()
                        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    else:
                        await script(keys=keys, args=args, client=pipe)
                return list(await pipe.execute())
        except rexc.ResponseError as exc:
            if not _noscript(exc):
                raise
            if attempt == _SCRIPT_LOADS - 1:
                raise
            if is_cluster(client):
                # a cluster pipeline does not load scripts before it runs (a single node's
                # does): SCRIPT LOAD goes to every master, a new one after a failover included
                script.sha = await client.script_load(script.script)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Convert redis-py exceptions into eventcore's tree; ``what`` names the operation."""
    try:
        yield
    except (rexc.ConnectionError, rexc.TimeoutError) as exc:
        # some carry no message (MaxConnectionsError): their type is then all there is to say
        raise RedisUnavailable(f"{what}: Redis unavailable after retries: "
                               f"{str(exc) or type(exc).__name__}") from exc
    except rexc.ResponseError as exc:
        if "WRONGTYPE" in str(exc):  # Redis 6.2 wraps script errors in "Error running script"
            raise CorruptEntry(f"{what}: a key holds the wrong type: {exc}") from exc
        if str(exc).startswith(("MOVED ", "ASK ")):  # the cluster client parses these itself
            raise RedisError(f"{what}: {exc}: a Redis Cluster node answered a single-node "
                             "client (EVENTCORE_REDIS_MODE=single?)") from exc
        raise RedisError(f"{what}: {exc}") from exc
    except rexc.RedisError as exc:
        raise RedisError(f"{what}: {exc}") from exc
    except rexc.RedisClusterException as exc:  # not a RedisError in redis-py
        if _unreachable(exc):
            raise RedisUnavailable(f"{what}: Redis Cluster unavailable after retries: {exc}"
                                   ) from exc
        raise RedisError(f"{what}: {exc}") from exc


# -- Redis Cluster ----------------------------------------------------------------------------

async def open_redis(
    url: str,
    *,
    mode: RedisMode = "auto",
    cluster_nodes: Sequence[str] = (),
    retry_budget_s: float = 15.0,
    max_connections: int = 64,
) -> Redis:
    """The client for ``url``: a single-node client, or a cluster client when ``mode`` says so
    or (``auto``) when the server says ``cluster_enabled:1``. ``cluster_nodes`` (``host:port``)
    are extra seeds, tried when the URL's node is down at start."""
    if mode == "cluster" or (mode == "auto" and cluster_nodes):
        return await connect_cluster(url, cluster_nodes, retry_budget_s=retry_budget_s,
                                     max_connections=max_connections)
    single = connect_redis(url, retry_budget_s=retry_budget_s, max_connections=max_connections)
    if mode == "single" or url.startswith("unix://"):
        return single
    try:
        with redis_errors("connect"):
            try:
                info = await single.info("cluster")
            except rexc.ResponseError:  # INFO denied (ACL, renamed): EVENTCORE_REDIS_MODE decides
                info = {}
    except BaseException:
        await single.aclose()
        raise
    if not info.get("cluster_enabled"):
        return single
    await single.aclose()
    return await connect_cluster(url, cluster_nodes, retry_budget_s=retry_budget_s,
                                 max_connections=max_connections)


async def connect_cluster(
    url: str, seeds: Sequence[str] = (), *, retry_budget_s: float = 15.0,
    max_connections: int = 64, sharded_pubsub: bool | None = None,
) -> Redis:
    """A Redis Cluster client (redis-py's, following MOVED and ASK) whose commands and
    pipelines retry transient errors (connection loss, CLUSTERDOWN, TRYAGAIN, a slot not
    covered during a failover) for ``retry_budget_s``, re-reading the slot map between tries.

    Typed as :data:`Redis`: the command API is the same. What differs: there is no
    ``connection_pool`` (each node has its own connections), a pipeline runs on the nodes of
    its keys' slots, and ``pipeline(transaction=True)`` (MULTI/EXEC) needs every key in one
    slot. ``sharded_pubsub``: whether the cluster has sharded pub/sub, when a client of the
    same cluster already found out (else every master is asked).
    """
    if url.startswith("unix://"):
        raise ConfigError("Redis Cluster needs redis:// or rediss:// URLs, not unix://")
    startup = []
    for seed in seeds:
        host, sep, port = seed.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"cluster node {seed!r} is not host:port")
        startup.append(LeakFreeNode(host, int(port)))
    client = _ClusterClient.from_url(
        url,
        startup_nodes=startup or None,
        retry_budget_s=retry_budget_s,
        # a dead node's connect fails fast: the budget is spent re-reading the slot map (a
        # replica may have been promoted meanwhile), not on one address
        retry=Retry(ExponentialWithJitterBackoff(base=_BACKOFF_BASE, cap=_BACKOFF_CAP), 2),
        retry_on_error=[rexc.ConnectionError, rexc.TimeoutError],
        cluster_error_retry_attempts=1,
        # per node; a command finding them all busy waits (within the budget) for one
        max_connections=max_connections,
        socket_connect_timeout=5,
        socket_keepalive=True,
    )
    # nodes found at initialize() take the class from here (the startup nodes only ask
    # CLUSTER SLOTS)
    client.connection_kwargs["connection_class"] = _fast_packing(
        client.connection_kwargs.get("connection_class", Connection))
    try:
        with redis_errors("connect"):
            ours = cast(_ClusterClient, client)
            await client.initialize()  # the slot map, from the first seed that answers
            ours.sharded_pubsub = (await _sharded_pubsub(ours) if sharded_pubsub is None
                                   else sharded_pubsub)
    except BaseException:
        await client.aclose()
        raise
    return cast(Redis, client)


async def _sharded_pubsub(client: _ClusterClient) -> bool:
    """Whether every master that answers has sharded pub/sub (SSUBSCRIBE, SPUBLISH: Redis
    7.0+). A master that is down (killed, its failover under way) is left out: the client
    serves the others' slots meanwhile, and its replica, promoted, runs the same version.
    Raises when no master answers."""
    answered = False
    last: Exception | None = None
    for node in client.get_primaries():
        try:
            info = await client.execute_command("INFO", "server", target_nodes=node)
        except (rexc.ConnectionError, rexc.TimeoutError) as exc:
            last = exc
            continue
        answered = True
        version = str(info.get("redis_version", "0"))
        if int(version.partition(".")[0] or 0) < 7:
            return False
    if not answered:
        raise last or rexc.ConnectionError("no master of the cluster answered")
    return True


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (see :func:`connect_cluster`)."""
    return isinstance(client, RedisCluster)


_TRANSIENT: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # with LOADING (BusyLoadingError) and a node's MaxConnectionsError
    rexc.TimeoutError,
    rexc.ClusterError,  # CLUSTERDOWN, and redis-py's "TTL exhausted" after many redirections
    rexc.TryAgainError,
    rexc.SlotNotCoveredError,
    # a transaction queued on a master that stopped serving its slot (failover, reshard)
    rexc.AskError,  # MOVED too
    rexc.ReadOnlyError,
)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) or _unreachable(exc)


def _unreachable(exc: BaseException) -> bool:
    """redis-py's "no startup node answered" (the whole cluster, or what we knew of it, down)."""
    return isinstance(exc, rexc.RedisClusterException) and isinstance(
        exc.__cause__, (rexc.ConnectionError, rexc.TimeoutError, OSError))


def _reset_under_us(exc: BaseException) -> bool:
    """redis-py's cluster pipeline reading the default node after another task's failed
    command reset the client (its ``aclose()``, as redis-py does on a connection error, sets
    the default node to None until the slot map is read again): retried as transient."""
    return isinstance(exc, AttributeError) and "'NoneType' object has no attribute" in str(exc)


class _Budget:
    """Exponential backoff (base 50 ms, cap 1 s, jitter) until ``budget_s`` is spent."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.backoff = ExponentialWithJitterBackoff(base=_BACKOFF_BASE, cap=_BACKOFF_CAP)
        self.failures = 0

    async def wait(self, exc: BaseException) -> None:
        """Sleep before the next try, or raise ``exc`` if the budget is spent."""
        self.failures += 1
        delay = self.backoff.compute(self.failures)
        if time.monotonic() + delay > self.deadline:
            raise exc
        await anyio.sleep(delay)


_NOT_CALLBACK_OPTIONS = frozenset({"keys", EMPTY_RESPONSE, NEVER_DECODE})


_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})


def _text_upper(value: str | bytes) -> str:
    return (value.decode() if isinstance(value, bytes) else value).upper()


class _ClusterClient(RedisCluster):
    """redis-py's cluster client with eventcore's retry budget around every command.

    redis-py retries a failed command at once, a fixed number of times: a restarting master
    or a failover (seconds) outlasts that. Here each command is tried again, with backoff,
    until the budget is spent; each try re-reads the slot map when the last one failed on a
    connection or CLUSTERDOWN (redis-py drops its map then).
    """

    def __init__(self, *args: Any, retry_budget_s: float = 15.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes_manager.__class__ = RedirectSafeNodes
        self.commands_parser = AnyNodeCommands(self.nodes_manager)
        self.nodes_manager.startup_nodes = Seeds(self.nodes_manager.startup_nodes)
        self.retry_budget_s = retry_budget_s
        self._seeds = {n.name: (n.host, n.port) for n in self.nodes_manager.startup_nodes.values()}

    async def initialize(self) -> RedisCluster:
        # redis-py drops a node from its seeds whenever a command on it loses its connection,
        # and it drops every connection when one fails: a burst across a restart can leave no
        # seed at all ("Redis Cluster cannot be connected ... None"). Every node ever seen
        # stays a seed here.
        if self._initialize:
            self._reseed()
        await super().initialize()
        self._adopt_nodes()
        return self

    def _reseed(self) -> None:
        seeds = self.nodes_manager.startup_nodes
        for name, (host, port) in self._seeds.items():
            if name not in seeds:
                seeds[name] = LeakFreeNode(host, port, **self.connection_kwargs)

    def _adopt_nodes(self) -> None:
        nodes = self.nodes_manager
        adopt(nodes.nodes_cache.values())
        adopt(nodes.startup_nodes.values())
        for node in nodes.nodes_cache.values():
            self._seeds.setdefault(node.name, (node.host, node.port))

    async def _execute_command(self, target_node: ClusterNode, *args: Any, **kwargs: Any
                               ) -> Any:
        adopt((target_node,))  # one made at a redirection (MOVED/ASK) since the last map read
        return await super()._execute_command(target_node, *args, **kwargs)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        budget: _Budget | None = None  # made on the first failure: most commands never fail
        while True:
            try:
                return await super().execute_command(*args, **dict(kwargs))
            except Exception as exc:
                pinned = not isinstance(kwargs.get("target_nodes", ""), str)  # nodes, not a flag
                if pinned or not _transient(exc):
                    raise
                budget = budget or _Budget(self.retry_budget_s)
                await budget.wait(exc)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # XREAD/XREADGROUP have "movable keys": redis-py asks a node for them (COMMAND
        # GETKEYS, a round trip and a command per read, every poll of a group read on every
        # shard). They are the first half of what follows STREAMS.
        if isinstance(command, str | bytes) and _text_upper(command) in _STREAM_READS:
            at = next((i for i, a in enumerate(args)
                       if isinstance(a, str | bytes) and _text_upper(a) == "STREAMS"), None)
            if at is not None:
                rest = args[at + 1:]
                keys = rest[:len(rest) // 2]
                slots = {self.keyslot(k) for k in keys}
                if len(slots) == 1:
                    return slots.pop()
        return await super()._determine_slot(command, *args)

    #: the masters have sharded pub/sub (set by :func:`connect_cluster`): scripts publish with
    #: SPUBLISH and listeners subscribe on each master (:mod:`eventcore._channels`); else
    #: PUBLISH, which a cluster broadcasts to every node, and one SUBSCRIBE on any node
    sharded_pubsub = False

    def register_script(self, script: Any) -> AsyncScript:  # type: ignore[override]
        if self.sharded_pubsub and isinstance(script, str):
            script = sharded(script)
        return super().register_script(script)  # type: ignore[misc]

    async def refresh_slots(self) -> None:
        """Read the slot map again now (a node answered MOVED or dropped a sharded
        subscription: its slots moved), from every node ever seen."""
        self._reseed()
        await self.nodes_manager.initialize()
        self._adopt_nodes()

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            raise rexc.RedisClusterException("shard_hint is not supported in cluster mode")
        return _ClusterPipeline(self, transaction=bool(transaction))  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline within the retry budget; with ``transaction``, MULTI/EXEC on the
    master of the one slot all its keys are in (redis-py 5's cluster pipeline has no
    transactions)."""

    def __init__(self, client: _ClusterClient, *, transaction: bool) -> None:
        super().__init__(client)
        self._cluster = client
        self._transaction = transaction

    async def initialize(self) -> ClusterPipeline:
        # redis-py reads the slot map here, on entering the block, outside any retry: a dead
        # node met there (a failover) failed the pipeline at once. execute() reads it within
        # the retry budget instead.
        self._command_stack = []
        return self

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        stack = self._command_stack
        if not stack:
            return []
        budget = _Budget(self._cluster.retry_budget_s)
        try:
            while True:
                try:
                    if self._cluster._initialize:
                        await self._cluster.initialize()
                    adopt(self._cluster.nodes_manager.nodes_cache.values())  # see above
                    if self._transaction:
                        return await self._multi_exec(stack)
                    return await self._execute(
                        self._cluster, stack, raise_on_error=raise_on_error,
                        allow_redirections=allow_redirections)
                except Exception as exc:
                    if not (_transient(exc) or _reset_under_us(exc)):
                        raise
                    if not isinstance(exc, rexc.MaxConnectionsError):
                        # a node failed or a slot moved: read the slot map again next time
                        await self._cluster.aclose()
                    await budget.wait(exc)
        finally:
            self._command_stack = []

    async def _multi_exec(self, stack: list[Any]) -> list[Any]:
        client = self._cluster
        slots = {await client._determine_slot(*cmd.args) for cmd in stack}
        if len(slots) != 1:
            raise rexc.RedisClusterException(
                "a transaction in Redis Cluster needs every key in one slot "
                f"(these are in {len(slots)})")
        node = client.nodes_manager.get_node_from_slot(slots.pop())
        conn = node.acquire_connection()
        try:
            await conn.send_packed_command(conn.pack_commands(
                [("MULTI",), *(cmd.args for cmd in stack), ("EXEC",)]), False)
            await conn.read_response()
            queued: list[BaseException] = []
            for _ in stack:
                try:
                    await conn.read_response()
                except rexc.ResponseError as exc:
                    queued.append(exc)
            try:
                replies = await conn.read_response()
            except rexc.ExecAbortError:
                raise queued[0] if queued else rexc.ExecAbortError("EXECABORT") from None
        except BaseException:
            await conn.disconnect()  # a reply may still be on the wire
            raise
        finally:
            node._free.append(conn)
        if replies is None:
            raise rexc.WatchError("transaction aborted")
        out = []
        for cmd, reply in zip(stack, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            callback = node.response_callbacks.get(cmd.args[0])
            # as redis-py's ClusterNode.parse_response: these options are not the callback's
            options = {k: v for k, v in cmd.kwargs.items() if k not in _NOT_CALLBACK_OPTIONS}
            out.append(callback(reply, **options) if callback else reply)
        return out


def text(value: Any) -> str:
    """A Redis reply value (bytes, a number, None) as text."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
