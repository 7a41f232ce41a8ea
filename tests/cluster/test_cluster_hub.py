"""The SSE hub's live paths on a local 3-master Redis Cluster: followers of sessions on every
master get every event live, gap-free, in both modes (the sweep an hour away, so only the
notifications carry them); across a master's restart nothing is missed; the connections per
node stay bounded whatever the shard count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import anyio
import pytest
from cluster_support import clients_on, master_of, sessions_on_every_master, subscribers_on

from eventcore import Envelope, EventLog, load_settings
from eventcore.errors import EventcoreError
from eventcore.server._hub import Hub
from eventcore.testing._server import LocalCluster
from eventcore.testing.invariants import read_all

SAFETY_S = 90
Live = Literal["pubsub", "xread"]
MODES = pytest.mark.parametrize("live", ["pubsub", "xread"])


class Followers:
    """One hub follower per session, from seq 0, recording every seq it is given."""

    def __init__(self, hub: Hub, sids: list[str]) -> None:
        self.hub = hub
        self.seqs: dict[str, list[int]] = {sid: [] for sid in sids}
        self._changed = anyio.Event()

    async def follow(self, sid: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with self.hub.subscribe(sid, 0, until_ended=False) as sub:
            task_status.started()
            async for batch in sub.batches():
                self.seqs[sid].extend(e.seq for e in batch)
                self._changed.set()
                self._changed = anyio.Event()

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        for sid in self.seqs:
            await tg.start(self.follow, sid)

    async def until_at(self, last: dict[str, int]) -> None:
        with anyio.fail_after(SAFETY_S):
            while any((self.seqs[s][-1] if self.seqs[s] else 0) < n for s, n in last.items()):
                await self._changed.wait()


def redis_cluster_sharded(cluster: LocalCluster) -> bool:
    return not cluster.nodes[0].version.startswith(("6.", "5."))


async def _heads(log: EventLog, sids: list[str]) -> dict[str, int]:
    return {sid: len(await read_all(log, sid)) for sid in sids}


@MODES
async def test_followers_on_every_master_get_every_event_live(
    redis_cluster: LocalCluster, live: Live
) -> None:
    settings = load_settings(redis_url=redis_cluster.url, namespace=f"hub{live}", shards=16,
                             retry_budget_s=10)
    async with EventLog(settings) as log:
        by_master = sessions_on_every_master(redis_cluster, log, 3, prefix=live)
        sids = [s for group in by_master.values() for s in group]
        for sid in sids:
            await log.create_session(session_id=sid)
        async with Hub(log, live=live, resync_s=3600) as hub, \
                anyio.create_task_group() as tg:
            followers = Followers(hub, sids)
            await followers.start(tg)
            await followers.until_at(dict.fromkeys(sids, 1))  # caught up: session.created
            notified = hub.stats.notifications
            for i in range(20):
                for sid in sids:
                    await log.append(Envelope(type="m", session_id=sid, payload=i))
            await followers.until_at(dict.fromkeys(sids, 21))
            tg.cancel_scope.cancel()
        for sid in sids:
            assert followers.seqs[sid] == list(range(1, 22)), sid  # gap-free, once each
        # live, by the notifications of every master's shards (the sweep never ran)
        assert hub.stats.notifications - notified >= 20 * len(sids)
        assert hub.stats.missed == 0 and hub.stats.fetched_events >= 20 * len(sids)


@MODES
@pytest.mark.redis_restart
@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "sigkill"])
async def test_a_master_restart_misses_no_event(
    redis_cluster_factory: Callable[..., LocalCluster], live: Live, hard: bool
) -> None:
    cluster = redis_cluster_factory()
    settings = load_settings(redis_url=cluster.url, namespace="rs", shards=16,
                             retry_budget_s=20)
    async with EventLog(settings) as log:
        by_master = sessions_on_every_master(cluster, log, 2)
        sids = [s for group in by_master.values() for s in group]
        for sid in sids:
            await log.create_session(session_id=sid)
        victim = master_of(cluster, log.keys.session(sids[0]).stream)
        async with Hub(log, live=live, resync_s=3600) as hub, \
                anyio.create_task_group() as tg:
            followers = Followers(hub, sids)
            await followers.start(tg)
            resyncs = hub.stats.resyncs
            # (Redis 6.2: the one SUBSCRIBE is on any master, maybe not this one)
            listened = subscribers_on(victim) > 0
            assert listened or not redis_cluster_sharded(cluster)
            halfway = anyio.Event()
            appended = 0

            async def produce(p: int) -> None:
                nonlocal appended
                for i in range(30):
                    sid = sids[(p + i) % len(sids)]
                    try:
                        await log.append(Envelope(type="m", session_id=sid, payload=[p, i],
                                                  event_key=f"p{p}-{i}"))
                    except EventcoreError:
                        # past the budget (the restart took long): the key makes this safe
                        await log.append(Envelope(type="m", session_id=sid, payload=[p, i],
                                                  event_key=f"p{p}-{i}"))
                    appended += 1
                    if appended >= 60:
                        halfway.set()
                    await anyio.sleep(0.01)  # a steady trickle across the restart

            async def restart() -> None:
                await halfway.wait()
                await anyio.to_thread.run_sync(lambda: victim.restart(hard=hard))

            async with anyio.create_task_group() as producers:
                producers.start_soon(restart)
                for p in range(6):
                    producers.start_soon(produce, p)
            heads = await _heads(log, sids)
            await followers.until_at(heads)
            # the listener subscribed again once the master was back, and the hub re-read
            # every watch then (nothing else would: the sweep is an hour away)
            assert hub.stats.resyncs > resyncs or not listened
            tg.cancel_scope.cancel()
        for sid in sids:
            assert followers.seqs[sid] == list(range(1, heads[sid] + 1)), sid
        assert sum(heads.values()) == len(sids) + 6 * 30


@MODES
async def test_connections_per_node_do_not_grow_with_the_shards(
    redis_cluster: LocalCluster, live: Live
) -> None:
    """The hub's connections to each master: its notifications' and its fetches', for 16 and
    64 shards alike (one per master each, not per shard)."""
    masters = redis_cluster.masters()
    grown: dict[int, list[int]] = {}
    listening: dict[int, list[int]] = {}
    for shards in (16, 64):
        settings = load_settings(redis_url=redis_cluster.url, namespace=f"cn{live}{shards}",
                                 shards=shards, retry_budget_s=10)
        async with EventLog(settings) as log:
            by_master = sessions_on_every_master(redis_cluster, log, 8, prefix=f"c{shards}")
            sids = [s for group in by_master.values() for s in group]
            for sid in sids:
                await log.create_session(session_id=sid)
            before = {n.port: clients_on(n) for n in masters}
            async with Hub(log, live=live, resync_s=3600) as hub, \
                    anyio.create_task_group() as tg:
                followers = Followers(hub, sids)
                await followers.start(tg)
                for i in range(5):
                    for sid in sids:
                        await log.append(Envelope(type="m", session_id=sid, payload=i))
                await followers.until_at(dict.fromkeys(sids, 6))
                grown[shards] = [clients_on(n) - before[n.port] for n in masters]
                listening[shards] = [subscribers_on(n) for n in masters]
                tg.cancel_scope.cancel()
    sharded = redis_cluster_sharded(redis_cluster)
    for shards, added in grown.items():
        # the notifications' connection, the fetches' and the followers' first pages', per
        # master (the appends' connections were open before)
        assert all(0 < a <= 4 for a in added), (shards, added)
        # one listening connection per master (Redis 6.2: one in all, PUBLISH is broadcast)
        assert listening[shards] == [1, 1, 1] if sharded else sum(listening[shards]) == 1
