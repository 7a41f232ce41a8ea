"""Helpers of the cluster tests: sessions placed on every master, connections per node, a
replica stopped and a master failed over."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio

from eventcore import EventLog
from eventcore.testing._server import LocalCluster, RedisServer


@contextmanager
def stopped(server: RedisServer) -> Iterator[None]:
    """The server's process stopped (SIGSTOP): it neither replicates nor answers."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def sessions_on(cluster: LocalCluster, log: EventLog, master: RedisServer, n: int,
                prefix: str) -> list[str]:
    """``n`` session ids whose stream ``master`` serves."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        sid = f"{prefix}-{i}"
        i += 1
        if cluster.node_of_slot(cluster.keyslot(log.keys.session(sid).stream)) is master:
            out.append(sid)
    return out


async def fail_over(cluster: LocalCluster, victim: RedisServer, replica: RedisServer) -> None:
    """SIGKILL ``victim``; its replica takes over (without the dead master's consent)."""
    victim.kill()
    await anyio.to_thread.run_sync(lambda: replica.command("CLUSTER", "FAILOVER", "TAKEOVER"))
    alive = [n for n in cluster.nodes if n is not victim]

    def promoted() -> bool:
        try:
            return all("cluster_state:ok" in n.command("CLUSTER", "INFO") for n in alive) and \
                all(f":{replica.port}@" in line and "master" in line
                    for n in alive for line in n.command("CLUSTER", "NODES").splitlines()
                    if line.split()[0] == replica_id)
        except OSError:
            return False

    replica_id = replica.command("CLUSTER", "MYID").strip()
    with anyio.fail_after(60):
        while not await anyio.to_thread.run_sync(promoted):  # noqa: ASYNC110 - cluster state
            await anyio.sleep(0.05)


async def master_with_replica(factory: Callable[..., RedisServer]
                              ) -> tuple[RedisServer, RedisServer]:
    """A single-node master and its replica (from ``redis_server_factory``), once their
    replication link is up."""
    master = factory()
    replica = factory(extra=("--replicaof", "127.0.0.1", str(master.port)))
    with anyio.fail_after(30):
        while "master_link_status:up" not in replica.command("INFO", "replication"):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # replication has no notification to await
    return master, replica


async def rejoin_as_replica(victim: RedisServer, master: RedisServer) -> None:
    """Start the failed-over ``victim`` again: it comes back as ``master``'s replica; returns
    once their link is up."""
    await anyio.to_thread.run_sync(victim.start)
    with anyio.fail_after(60):
        while "state=online" not in master.command("INFO", "replication"):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # replication has no notification to await


def sessions_on_every_master(
    cluster: LocalCluster, log: EventLog, per: int, prefix: str = "s"
) -> dict[int, list[str]]:
    """``per`` session ids served by each master (by port), in distinct shards where the
    shards allow it."""
    out: dict[int, list[str]] = {n.port: [] for n in cluster.masters()}
    shards: set[int] = set()
    i = 0
    while any(len(v) < per for v in out.values()):
        sid = f"{prefix}-{i}"
        i += 1
        shard = log.keys.shard_of(sid)
        port = cluster.node_of_slot(cluster.keyslot(log.keys.session(sid).stream)).port
        if len(out[port]) < per and (shard not in shards or i > 10_000):
            out[port].append(sid)
            shards.add(shard)
    return out


def master_of(cluster: LocalCluster, key: str) -> RedisServer:
    return cluster.node_of_slot(cluster.keyslot(key))


def clients_on(node: RedisServer) -> int:
    """The client connections ``node`` has now, this question's own not counted."""
    return len(node.command("CLIENT", "LIST").splitlines()) - 1


def subscribers_on(node: RedisServer) -> int:
    """The connections of ``node`` subscribed to channels (sharded or not)."""
    count = 0
    for line in node.command("CLIENT", "LIST").splitlines():
        fields = dict(kv.partition("=")[::2] for kv in line.split())
        if any(int(fields.get(k) or 0) for k in ("sub", "ssub", "psub")):
            count += 1
    return count
