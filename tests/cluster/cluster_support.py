"""Helpers of the cluster tests: sessions placed on every master, connections per node."""

from __future__ import annotations

from eventcore import EventLog
from eventcore.testing._server import LocalCluster, RedisServer


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
