"""The one listener of eventcore's pub/sub channels (the append script's ``notify`` and ``wake``,
the dispatch channels of :meth:`~eventcore._keys.Keys.dispatched`).

``async with Channels(client, channels) as listener:`` returns once every channel is
subscribed; ``async for event in listener`` then yields:

- :class:`Message`: something published on one of the channels;
- :class:`Subscribed`: those channels are subscribed (the first time, or again after a lost
  connection, a failover, a slot moved; or the reader fell behind and queued messages were
  dropped): **anything published to them meanwhile may be lost**, so a caller re-reads what it
  follows (pub/sub is at most once);
- :class:`Lost`: a connection failed (a typed :class:`~eventcore.errors.EventcoreError`);
  its channels are subscribed again as soon as possible, then :class:`Subscribed` follows.
  Once per outage of a connection (or per failed first attempt), not once per attempt.

How it subscribes:

- **one Redis node**: one connection, ``SUBSCRIBE`` to every channel (any version, 6.2 too);
- **Redis Cluster 7+** (the scripts publish with ``SPUBLISH``, see :mod:`eventcore._scripts`):
  one connection per master, ``SSUBSCRIBE`` there to the channels whose slots it serves. So
  connections grow with the masters, not with the shards. The listener follows the topology:
  a ``MOVED`` answer, a ``sunsubscribe`` pushed by the server (its slot was migrated, or the
  master was demoted by a failover) or a lost connection re-reads the slot map and moves the
  channels to the masters serving them now; the slot map in hand is compared every
  ``refresh_s`` too, on a short connection of its own;
- **Redis Cluster before 7.0** (or a foreign cluster client): the scripts ``PUBLISH``, which a
  cluster broadcasts to every node: one connection, ``SUBSCRIBE`` on any master (the next one
  after a failure).

A silent connection is probed with ``PING`` after ``ping_s``; no answer within ``ping_s`` more
and it is replaced. The connections are the listener's own (not taken from the client's pools).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Self

import anyio
import redis.exceptions as rexc
from anyio.abc import TaskGroup, TaskStatus

from ._redis import Redis, is_cluster, redis_errors
from .errors import EventcoreError, RedisError

__all__ = ["ChannelEvent", "Channels", "Lost", "Message", "Subscribed"]

log = logging.getLogger("eventcore.channels")

_BACKOFF = 0.05
_BACKOFF_CAP = 2.0


class Message(NamedTuple):
    """``data`` published on ``channel``."""

    channel: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Subscribed:
    """``channels`` are subscribed (again): anything published to them before may be lost.
    ``overflow``: not a new subscription, the reader fell behind and queued messages were
    dropped."""

    channels: frozenset[str]
    overflow: bool = False


@dataclass(frozen=True, slots=True)
class Lost:
    """The connection of ``channels`` failed with ``error``; they are being subscribed again."""

    channels: frozenset[str]
    error: EventcoreError


ChannelEvent = Message | Subscribed | Lost


@dataclass(frozen=True, slots=True)
class _Route:
    """One connection: where, with which command, to which channels."""

    name: str
    connect: Callable[[], Any]  # a new, unconnected redis-py asyncio Connection
    command: str  # SUBSCRIBE or SSUBSCRIBE
    channels: tuple[str, ...]
    rotate: bool = False  # any node would do: after a failure try the next one


class Channels:
    """The listener of ``channels`` on ``client`` (a single-node or cluster client of
    :func:`eventcore._redis.open_redis`): see the module's documentation.

    ``max_pending`` bounds the messages queued for a slow reader; beyond it they are dropped
    and :class:`Subscribed` (``overflow``) tells the reader to re-read."""

    def __init__(
        self, client: Redis, channels: Sequence[str], *, ping_s: float = 10.0,
        refresh_s: float = 30.0, max_pending: int = 100_000,
    ) -> None:
        if not channels:
            raise ValueError("Channels needs at least one channel")
        self.client = client
        self.channels = tuple(dict.fromkeys(channels))
        self.ping_s = ping_s
        self.refresh_s = refresh_s
        self.max_pending = max_pending
        self.cluster = is_cluster(client)
        self.sharded = self.cluster and bool(getattr(client, "sharded_pubsub", False))
        #: subscriptions made (first ones included) and connections lost, for tests and metrics
        self.subscriptions = 0
        self.losses = 0
        self._subscribed: set[str] = set()
        self._ready = anyio.Event()
        self._queue: collections.deque[ChannelEvent] = collections.deque()
        self._queued = anyio.Event()
        self._messages = 0  # Message items in the queue
        self._replan = anyio.Event()
        self._refresh = False
        self._rotation = 0
        self._slots: list[tuple[int, int, str]] = []  # cluster: (first slot, last, master)
        self._tg: TaskGroup | None = None

    @property
    def connected(self) -> bool:
        """Every channel is subscribed now."""
        return len(self._subscribed) == len(self.channels)

    def routes(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The connections wanted now: (node ``host:port``, command, channels)."""
        return [(r.name, r.command, r.channels) for r in self._plan()[0]]

    # -- lifetime --------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self._run)
        except BaseException as exc:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tg is not None:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(et, e, tb)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChannelEvent:
        while not self._queue:
            self._queued = anyio.Event()
            await self._queued.wait()
        item = self._queue.popleft()
        if type(item) is Message:
            self._messages -= 1
        return item

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._supervise, tg)
            await self._ready.wait()
            task_status.started()

    # -- the queue to the reader -------------------------------------------------------------------
    def _put(self, item: ChannelEvent) -> None:
        if type(item) is Message:
            if self._messages >= self.max_pending:
                self._queue = collections.deque(
                    i for i in self._queue if type(i) is not Message)
                self._messages = 0
                self._queue.append(Subscribed(frozenset(self.channels), overflow=True))
                log.warning("pub/sub reader behind by %d messages: dropped them",
                            self.max_pending)
            self._messages += 1
        self._queue.append(item)
        self._queued.set()

    # -- where to subscribe -----------------------------------------------------------------------
    def _plan(self) -> tuple[list[_Route], bool]:
        """The connections wanted, and whether they cover every channel."""
        if not self.cluster:
            pool: Any = self.client.connection_pool
            kwargs = pool.connection_kwargs
            name = str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")
            return [_Route(name, lambda: pool.connection_class(**kwargs), "SUBSCRIBE",
                           self.channels)], True
        cluster: Any = self.client
        if not self.sharded:
            masters = sorted({m for _, _, m in self._slots})
            if not masters:
                return [], False
            name = masters[self._rotation % len(masters)]
            return [_Route(name, self._connector(name), "SUBSCRIBE", self.channels,
                           rotate=True)], True
        by_node: dict[str, list[str]] = {}
        covered = True
        for channel in self.channels:
            slot = cluster.keyslot(channel)
            served = next((m for low, high, m in self._slots if low <= slot <= high), None)
            if served is None:
                covered = False  # not served (a failover under way): asked again shortly
                continue
            by_node.setdefault(served, []).append(channel)
        return [_Route(name, self._connector(name), "SSUBSCRIBE", tuple(chs))
                for name, chs in sorted(by_node.items())], covered

    def _connector(self, name: str) -> Callable[[], Any]:
        host, _, port = name.rpartition(":")
        cluster: Any = self.client
        kwargs = dict(cluster.connection_kwargs)  # the cluster client's, for every node
        kwargs.pop("response_callbacks", None)
        kwargs.pop("max_connections", None)
        cls = kwargs.pop("connection_class")
        return lambda: cls(host=host, port=int(port), **kwargs)

    async def _read_slots(self) -> None:
        """The slot map, as the first node that answers tells it, asked on a connection of
        our own (asking through the cluster client would make it drop its connections to a
        node that fails, and re-read its own map)."""
        cluster: Any = self.client
        names = [m for _, _, m in self._slots]  # the last map's masters first
        names += [n.name for n in cluster.get_primaries()]
        names += [n.name for n in cluster.get_nodes()]
        names += list(getattr(cluster, "_seeds", {}))
        error: BaseException | None = None
        for name in dict.fromkeys(names):
            conn = self._connector(name)()
            try:
                await conn.connect()
                await conn.send_command("CLUSTER", "SLOTS", check_health=False)
                reply = await conn.read_response(disable_decoding=True)
            except (rexc.RedisError, OSError) as exc:
                error = exc
                continue
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await conn.disconnect()
            host = name.rpartition(":")[0]
            self._slots = sorted(
                (int(low), int(high), f"{_text(served[0]) or host}:{int(served[1])}")
                for low, high, served, *_ in reply)
            return
        raise rexc.ConnectionError(f"no cluster node answered CLUSTER SLOTS: {error}")

    def _ask_replan(self) -> None:
        self._refresh = True
        self._replan.set()

    async def _supervise(self, tg: TaskGroup) -> None:
        running: dict[tuple[str, str, tuple[str, ...]], anyio.CancelScope] = {}
        delay = _BACKOFF
        self._refresh = self.cluster
        while True:
            self._replan = anyio.Event()
            covered = False
            try:
                if self._refresh:
                    self._refresh = False
                    with redis_errors("pub/sub slot map"):
                        await self._read_slots()
                routes, covered = self._plan()
            except EventcoreError as exc:
                log.warning("pub/sub: reading the slot map failed (%s); retrying", exc)
                self._refresh = True
            else:
                wanted = {(r.name, r.command, r.channels): r for r in routes}
                for key in [k for k in running if k not in wanted]:
                    running.pop(key).cancel()
                    self._subscribed.difference_update(key[2])
                for key, route in wanted.items():
                    if key not in running:
                        running[key] = scope = anyio.CancelScope()
                        tg.start_soon(self._connection, route, scope)
            if covered and not self._refresh:
                delay = _BACKOFF
                wait = self.refresh_s
            else:
                wait, delay = delay, min(delay * 2, _BACKOFF_CAP)
            with anyio.move_on_after(wait):
                await self._replan.wait()
            self._refresh = self._refresh or self.cluster  # every refresh_s: the map again

    # -- one connection ---------------------------------------------------------------------------
    async def _connection(self, route: _Route, scope: anyio.CancelScope) -> None:
        delay = _BACKOFF
        told = False  # Lost was queued since the last subscription
        with scope:
            while True:
                conn = route.connect()
                try:
                    with redis_errors(f"subscribe on {route.name}"):
                        await self._listen(route, conn)
                except EventcoreError as exc:
                    self.losses += 1
                    was = self._subscribed.intersection(route.channels)
                    self._subscribed.difference_update(route.channels)
                    if was or not told:  # once per outage, not per attempt
                        told = True
                        self._put(Lost(frozenset(route.channels), exc))
                    log.warning("pub/sub connection to %s lost (%s); subscribing again",
                                route.name, exc)
                    if route.rotate:
                        self._rotation += 1
                    if self.cluster:
                        self._ask_replan()  # a replica promoted, a slot moved?
                    if was:
                        delay = _BACKOFF  # it had worked: try again at once
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_CAP)
                finally:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await conn.disconnect()

    async def _listen(self, route: _Route, conn: Any) -> None:
        await conn.connect()
        if route.command == "SUBSCRIBE":
            commands = [("SUBSCRIBE", *route.channels)]
        else:  # a sharded subscription is one slot per command
            commands = [("SSUBSCRIBE", c) for c in route.channels]
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        pending = set(route.channels)
        probing = False
        seen = 0  # replies read
        put = self._put
        read = conn.read_response
        while True:
            before = seen
            # (no timeout per read, which costs a timer each: one deadline per ping_s; a read
            # cancelled there loses nothing, the parser keeps what it has not returned yet)
            with anyio.move_on_after(self.ping_s):
                while True:
                    try:
                        reply = await read(disable_decoding=True, disconnect_on_error=False)
                    except rexc.ResponseError as exc:
                        if isinstance(exc, rexc.AskError) or str(exc).startswith(
                                ("MOVED ", "ASK ")):
                            raise RedisError(f"{exc}: the slot map changed") from exc
                        raise
                    seen += 1
                    kind = reply[0]
                    if kind == b"message" or kind == b"smessage":
                        put(Message(reply[1], reply[2]))
                    elif kind == b"subscribe" or kind == b"ssubscribe":
                        pending.discard(reply[1].decode())
                        if not pending and not self._subscribed.issuperset(route.channels):
                            self._subscribed.update(route.channels)
                            self.subscriptions += 1
                            put(Subscribed(frozenset(route.channels)))
                            if self.connected:
                                self._ready.set()
                    elif kind == b"sunsubscribe" or kind == b"unsubscribe":
                        # the server dropped the subscription: its slot is served elsewhere
                        raise RedisError(f"{route.name} unsubscribed {reply[1].decode()}: the "
                                         "slot map changed")
            if seen != before:
                probing = False
            elif probing:
                raise rexc.TimeoutError(f"no answer to PING from {route.name}")
            else:  # nothing for ping_s: is it there?
                await conn.send_command("PING", check_health=False)
                probing = True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
