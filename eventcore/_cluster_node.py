"""Four fixes of redis-py 5.3's cluster client: a node that gives its connection back whatever
happens to a command, a slot map that stays right when one slot is redirected twice, a
connect that works while the slot map's first master is down, and seeds that never run out.

redis-py 5.3's ``ClusterNode`` returns a connection to its free list only after a command's
reply was read (and a pipeline's only after every reply): a command cancelled while its
connection connects or sends, or a pipeline cancelled while reading, leaves the connection
counted as in use for good. An API process whose SSE clients come and go (each disconnect
cancels whatever its follower was awaiting) runs out of them (``MaxConnectionsError``, every
command failing from then on). Here release is in a ``finally``; a connection interrupted
mid-command has already disconnected itself (redis-py does that on any exception there), so
the next user reconnects it and never reads another command's reply.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.exceptions as rexc
from redis._parsers import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, NodesManager, PipelineCommand
from redis.cluster import PRIMARY

__all__ = ["AnyNodeCommands", "LeakFreeNode", "RedirectSafeNodes", "Seeds", "adopt"]


class LeakFreeNode(ClusterNode):
    __slots__ = ()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        connection = self.acquire_connection()
        try:
            await connection.send_packed_command(connection.pack_command(*args), False)
            return await self.parse_response(connection, args[0], **kwargs)
        finally:
            self._free.append(connection)

    async def execute_pipeline(self, commands: list[PipelineCommand]) -> bool:
        connection = self.acquire_connection()
        try:
            await connection.send_packed_command(
                connection.pack_commands(cmd.args for cmd in commands), False)
            failed = False
            for cmd in commands:
                try:
                    cmd.result = await self.parse_response(connection, cmd.args[0],
                                                           **cmd.kwargs)
                except Exception as exc:  # a command's error is its result, as in redis-py
                    cmd.result = exc
                    failed = True
            return failed
        finally:
            self._free.append(connection)


def adopt(nodes: Iterable[ClusterNode]) -> None:
    """Make redis-py's nodes (it creates them itself, at every slot-map read and redirection)
    :class:`LeakFreeNode`: the same object and state, the methods above."""
    for node in nodes:
        if type(node) is ClusterNode:
            node.__class__ = LeakFreeNode


class RedirectSafeNodes(NodesManager):
    """redis-py applies a MOVED by demoting the slot's first node and promoting the redirected
    one. After a failover, commands already in flight to the old master come back MOVED one
    after the other: from the second on, the slot's first node *is* the redirected one, and
    redis-py demotes the new master itself (listing it twice). SCRIPT LOAD goes to the
    primaries, so it never reached that node again: every script of its slots failed with
    NOSCRIPT until the next full slot-map read. Here a redirection to the node that already
    serves the slot only makes sure it counts as a primary."""

    __slots__ = ()

    def _update_moved_slots(self) -> None:
        e = self._moved_exception
        nodes = self.slots_cache.get(e.slot_id) if e is not None else None
        if nodes and nodes[0].host == e.host and nodes[0].port == e.port:
            nodes[0].server_type = PRIMARY
            self.slots_cache[e.slot_id] = [n for i, n in enumerate(nodes)
                                           if not any(n is m for m in nodes[:i])]
            self._moved_exception = None  # type: ignore[assignment]  # as redis-py does
            return
        super()._update_moved_slots()


class AnyNodeCommands(AsyncCommandsParser):
    """The command table (``COMMAND``), asked of any node that answers.

    redis-py asks only the slot map's first master at every (re)initialize, so a client
    connecting while that master is down (killed, its failover not done yet) failed with its
    connection error, though every other node would have told the same table.
    """

    __slots__ = ("nodes",)

    def __init__(self, nodes: NodesManager) -> None:
        super().__init__()
        self.nodes = nodes

    async def initialize(self, node: ClusterNode | None = None) -> None:
        first = [node] if node is not None else []
        error: Exception | None = None
        for candidate in [*first, *(n for n in self.nodes.nodes_cache.values()
                                    if n is not node)]:
            try:
                await super().initialize(candidate)
            except (rexc.ConnectionError, rexc.TimeoutError) as exc:
                error = exc
                continue
            return
        raise error or rexc.ConnectionError("no cluster node answered COMMAND")


class Seeds(dict[str, ClusterNode]):
    """The startup nodes (``NodesManager.startup_nodes``), of which none is ever dropped.

    redis-py drops a node from them whenever a command on it loses its connection. Many
    commands failing at once (a burst across a master's restart) dropped them all, and the
    next slot-map read, under redis-py's own lock, had no node left to ask ("Redis Cluster
    cannot be connected ... None"). Here a dropped node is only moved last: the others are
    asked first. (A node gone from the slot map is still removed when the map is read.)
    """

    __slots__ = ()

    def pop(self, key: str, *default: Any) -> Any:
        if key in self and default:  # redis-py's drop: pop(name, None)
            node = super().pop(key)
            self[key] = node
            return node
        return super().pop(key, *default)
