"""Helpers of the cluster tests of the group runtime: the worker test apps, sessions on every
master, connections per node; the feed watcher is tests/workers' own."""

from __future__ import annotations

import sys
from pathlib import Path

from eventcore import EventLog
from eventcore.testing._server import LocalCluster

WORKERS = Path(__file__).parent.parent / "workers"
SUBSCRIBERS = Path(__file__).parent.parent / "subscribers"
for _p in (WORKERS, SUBSCRIBERS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# the feed watcher and polling helper of the worker tests (one XREAD per feed on a cluster)
from workers_support import FeedWatcher, eventually, watching  # noqa: E402

__all__ = ["FeedWatcher", "clients_per_master", "eventually", "master_port",
           "sessions_per_master", "watching"]


def master_port(cluster: LocalCluster, key: str) -> int:
    return cluster.node_of_slot(cluster.keyslot(key)).port


def sessions_per_master(cluster: LocalCluster, log: EventLog, per: int, prefix: str
                        ) -> dict[int, list[str]]:
    """``per`` session ids served by each master (by port)."""
    out: dict[int, list[str]] = {n.port: [] for n in cluster.masters()}
    i = 0
    while any(len(v) < per for v in out.values()):
        sid = f"{prefix}-{i}"
        i += 1
        port = master_port(cluster, log.keys.session(sid).stream)
        if len(out[port]) < per:
            out[port].append(sid)
    return out


def clients_per_master(cluster: LocalCluster) -> dict[int, int]:
    """Client connections on each master now (the asking connection not counted)."""
    return {n.port: len(n.command("CLIENT", "LIST").splitlines()) - 1
            for n in cluster.masters()}
