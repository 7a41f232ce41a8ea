"""Connecting to Redis, retrying transient errors, and converting redis-py errors at the edge."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .errors import CorruptEntry, RedisError, RedisUnavailable

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

_hiredis: Any
try:
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    _hiredis = None

__all__ = ["Redis", "connect_redis", "redis_errors", "run_script", "run_scripts", "text"]

Redis = aioredis.Redis

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
        except rexc.NoScriptError:
            continue
    return await script(keys=keys, args=args)


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
                    await script(keys=keys, args=args, client=pipe)
                return list(await pipe.execute())
        except rexc.NoScriptError:
            if attempt == _SCRIPT_LOADS - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Convert redis-py exceptions into eventcore's tree; ``what`` names the operation."""
    try:
        yield
    except (rexc.ConnectionError, rexc.TimeoutError) as exc:
        raise RedisUnavailable(f"{what}: Redis unavailable after retries: {exc}") from exc
    except rexc.ResponseError as exc:
        if "WRONGTYPE" in str(exc):  # Redis 6.2 wraps script errors in "Error running script"
            raise CorruptEntry(f"{what}: a key holds the wrong type: {exc}") from exc
        raise RedisError(f"{what}: {exc}") from exc
    except rexc.RedisError as exc:
        raise RedisError(f"{what}: {exc}") from exc


def text(value: Any) -> str:
    """A Redis reply value (bytes, a number, None) as text."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
