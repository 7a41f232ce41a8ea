"""The worker's Lua scripts, and a coalescer that sends concurrent per-session calls of one
script as one call per shard.

Each script takes a few shard-level keys and args, then a fixed number of keys and args per
item (session), and returns one result per item. Sessions end, idle out and retry at arbitrary
moments; coalescing them per event-loop tick keeps that at one round trip per shard however
many sessions a worker hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import msgspec

from eventcore._coalesce import ShardCoalescer
from eventcore._redis import Redis, redis_errors, run_script
from eventcore._redis import text as _text
from eventcore._scripts import lua

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["GROUP", "Claim", "Coalescer", "decode_claim", "load_script", "release_item"]

GROUP = "workers"


def load_script(name: str, *, with_prelude: bool = False) -> str:
    """A worker script, after the layout's table ``L``; ``with_prelude`` for those that write
    entries or session state (see :func:`eventcore._scripts.lua`)."""
    return lua("eventcore.workers", name, with_prelude=with_prelude, with_layout=True)


class Claim(msgspec.Struct, frozen=True):
    """What claim.lua answered for one dispatch entry (see the script's header).

    ``verdict``: ``ok`` (the caller hosts it now), ``held`` (``detail`` = the lease holder),
    ``gone``, ``ended``, ``missing``, ``corrupt`` (``detail`` = why). The rest is set for ``ok``:
    ``last_seq`` is the session's seq at the claim (before session.started); ``started`` the
    seq of session.started recorded by the claim, ``-seq`` of an earlier hosting's, 0 when the
    handler's task must append it; ``dead``: the session is dead-lettered; ``checkpoint_seq``
    the handler's last session.checkpoint (0: none). (A struct: built once per claimed
    session, it costs a fraction of a frozen dataclass.)"""

    verdict: str
    detail: str = ""
    epoch: int = 0
    agent: str = ""
    attempt: int = 1
    dead: bool = False
    error: str = ""
    created_at_ms: int | None = None
    labels: dict[str, Any] = msgspec.field(default_factory=dict)
    last_seq: int = 0
    started: int = 0
    checkpoint_seq: int = 0


def decode_claim(res: Sequence[Any]) -> Claim:
    """One item of claim.lua's reply, by name (the script's positional order, in one place)."""
    verdict = _text(res[0])
    if verdict != "ok":
        return Claim(verdict, _text(res[1]) if len(res) > 1 else "")
    (_, epoch, agent, attempt, dead, error, created_at, labels, seq, started,
     checkpoint) = res
    decoded = msgspec.json.decode(labels or b"{}")
    return Claim(
        verdict, epoch=int(epoch), agent=_text(agent), attempt=int(_text(attempt) or 1),
        dead=_text(dead) == "1", error=_text(error),
        created_at_ms=int(_text(created_at)) if _text(created_at) else None,
        labels=decoded if isinstance(decoded, dict) else {}, last_seq=int(_text(seq) or 0),
        started=int(started), checkpoint_seq=int(_text(checkpoint) or 0))


def release_item(mode: str, session_id: str, epoch: int, entry_id: str, a: Any = "",
                 b: Any = "") -> tuple[str, str, int, str, Any, Any]:
    """The args of one release.lua item; ``a``/``b`` mean what ``mode`` says (the script's
    header): only the Worker's per-mode release methods call this."""
    return (mode, session_id, epoch, entry_id, a, b)


Head = Callable[[int], tuple[list[str], list[Any]]]
Item = tuple[Sequence[str], Sequence[Any]]


class Coalescer:
    """``await call(shard, keys, args)`` -> this item's result; items queued in one tick for the
    same shard go out together (at most ``max_batch`` per call)."""

    def __init__(self, redis: Redis, script: str, head: Head, *, max_batch: int = 256) -> None:
        self._script: AsyncScript = redis.register_script(script)
        self._head = head
        self._max_batch = max_batch
        self._commit: ShardCoalescer[Item, Any] = ShardCoalescer(self._send,
                                                                  max_batch=max_batch)

    async def __aenter__(self) -> Self:
        await self._commit.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._commit.__aexit__(et, e, tb)

    async def call(self, shard: int, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._commit.submit(shard, (keys, args))

    async def run_batch(self, shard: int, items: Sequence[Item]) -> list[Any]:
        """Send ``items`` directly (chunked), bypassing the tick queue."""
        out: list[Any] = []
        for start in range(0, len(items), self._max_batch):
            out += await self._send(shard, items[start:start + self._max_batch])
        return out

    async def _send(self, shard: int, items: Sequence[Item]) -> list[Any]:
        keys, args = self._head(shard)
        keys, args = list(keys), list(args)
        for k, a in items:
            keys += k
            args += a
        with redis_errors("worker script"):
            result: list[Any] = await run_script(self._script, keys, args)
        return result
