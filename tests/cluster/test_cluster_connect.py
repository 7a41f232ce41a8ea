"""Connecting to a cluster one of whose masters is down (killed, not yet failed over) works:
the client serves the slots of the masters that are up. A worker's heartbeat connects its own
client while a failover is under way (CI: the victim was SIGKILLed between the heartbeat's
first PING and its probe of every master's version, and the worker gave up at start)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from eventcore._redis import connect_cluster
from eventcore.testing._server import LocalCluster
from eventcore.workers._heartbeat import thread_client


def _key_on(cluster: LocalCluster, node_index: int) -> str:
    wanted = cluster.masters()[node_index]
    return next(k for k in (f"probe{{{i}}}" for i in range(10_000))
                if cluster.node_of_slot(cluster.keyslot(k)) is wanted)


@pytest.mark.parametrize("down", [0, 2])
async def test_a_client_connects_while_a_master_is_down(
    redis_cluster_factory: Callable[..., LocalCluster], down: int,
) -> None:
    """``down`` 0: the first master of the slot map is the one down. redis-py asks it for
    COMMAND at connect (CI: a worker's heartbeat gave up on "Error 111" from it, the victim
    SIGKILLed while the heartbeat connected)."""
    cluster = redis_cluster_factory()
    alive = _key_on(cluster, 1)
    victim = cluster.masters()[down]
    first = await connect_cluster(cluster.url, cluster.addresses)
    try:
        victim.kill()
        # a client of its own made from one that knows the dead master (the heartbeat's)
        second = await thread_client(first)
        try:
            await second.set(alive, "1")
            assert await second.get(alive) == b"1"
        finally:
            await second.aclose()
        # a new process's, its URL the dead master's or not
        third = await connect_cluster(cluster.url, cluster.addresses)
        try:
            assert await third.get(alive) == b"1"
        finally:
            await third.aclose()
    finally:
        await first.aclose()


async def test_the_seeds_never_run_out(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    """redis-py drops a node from its seeds whenever a command on it loses its connection; many
    commands failing at once across a master's restart dropped them all, and the next slot-map
    read, under redis-py's own lock, found no seed to ask ("Redis Cluster cannot be connected.
    Please provide at least one reachable node: None"; CI: the burst test on Redis 6.2). A
    dropped seed is asked last instead."""
    cluster = redis_cluster_factory()
    client = await connect_cluster(cluster.url)
    try:
        nodes: Any = client.nodes_manager  # type: ignore[attr-defined]
        for name in list(nodes.startup_nodes):
            nodes.startup_nodes.pop(name, None)  # what redis-py does at a connection error
        assert nodes.startup_nodes
        await nodes.initialize()  # what redis-py's initialize() runs under its lock
        assert await client.set(_key_on(cluster, 1), "1")
    finally:
        await client.aclose()
