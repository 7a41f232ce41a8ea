"""Before a command starts its parts: is Redis there? A progress line on stderr while it is
being retried, one line and exit status 1 once the retry budget is spent (instead of a
traceback from deep inside the start-up)."""

from __future__ import annotations

import re
import time

import anyio
import redis.asyncio as aioredis
import typer
from redis import exceptions as rexc

from eventcore._settings import Settings

__all__ = ["redacted_url", "require_redis"]

_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


def redacted_url(url: str) -> str:
    return _PASSWORD.sub(r"\1***@", url)


async def _ping(url: str) -> str | None:
    """None when Redis answers PING, else why not (one line)."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2,
                                     retry_on_timeout=False)
    try:
        await client.ping()
        return None
    except (rexc.RedisError, OSError) as exc:
        return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    finally:
        await client.aclose()


async def wait_for_redis(command: str, url: str, budget_s: float, every_s: float = 2.0) -> None:
    """Return once ``url`` answers; print progress while retrying; after ``budget_s`` a one-line
    error and ``typer.Exit(1)``."""
    shown = redacted_url(url)
    deadline = time.monotonic() + max(budget_s, 0.0)
    first = True
    while True:
        why = await _ping(url)
        if why is None:
            if not first:
                typer.echo(f"eventcore {command}: Redis at {shown} is up", err=True)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            typer.echo(f"eventcore {command}: error: Redis at {shown} is unreachable ({why}); "
                       f"gave up after {budget_s:g} s (EVENTCORE_RETRY_BUDGET_S)", err=True)
            raise typer.Exit(1)
        typer.echo(f"eventcore {command}: waiting for Redis at {shown}: {why} (retrying for "
                   f"{left:.0f} s more)", err=True)
        first = False
        await anyio.sleep(min(every_s, left))  # the next attempt; nothing signals Redis is up


def require_redis(command: str, settings: Settings) -> None:
    """:func:`wait_for_redis` for a command's configured Redis (nothing to check for the
    embedded one, which the command starts itself)."""
    if not settings.redis_url:
        return
    urls = [settings.redis_url]
    anyio.run(lambda: wait_for_redis(command, urls[0], settings.retry_budget_s))
