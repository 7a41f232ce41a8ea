"""The cluster client's connections per node stay bounded when commands are cancelled: a
command or pipeline cancelled while its connection was connecting or reading gives the
connection back (redis-py 5.3's node kept it counted as in use forever, so an API process whose
SSE clients came and went ran out, MaxConnectionsError, 503 from then on)."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from eventcore import EventLog
from eventcore.testing._server import LocalCluster


def _in_use(log: EventLog) -> dict[str, int]:
    nodes = log.redis.nodes_manager.nodes_cache.values()  # type: ignore[attr-defined]
    return {n.name: len(n._connections) - len(n._free) for n in nodes}


async def _cancelled_at_once(log: EventLog, keys: list[str], pipelined: bool) -> None:
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for key in keys:
                if pipelined:
                    async def one(k: str = key) -> None:
                        async with log.redis.pipeline(transaction=False) as pipe:
                            pipe.get(k)
                            pipe.exists(k)
                            await pipe.execute()
                    tg.start_soon(one)
                else:
                    tg.start_soon(log.redis.get, key)
            await anyio.lowlevel.checkpoint()  # each is in its first await: connecting
            scope.cancel()


async def test_cancelled_commands_and_pipelines_give_their_connections_back(
    cluster_event_log: EventLog, redis_cluster: LocalCluster
) -> None:
    log = cluster_event_log
    keys = [f"{log.keys.namespace}:{{{i}}}:probe" for i in range(48)]  # every master
    for round_ in range(6):
        await _cancelled_at_once(log, keys, pipelined=round_ % 2 == 1)
        await log.redis.get(keys[0])  # the client still works
        assert set(_in_use(log).values()) == {0}, _in_use(log)
