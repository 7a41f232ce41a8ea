"""The core log on a local 3-master Redis Cluster: every operation on sessions of every shard,
the shards spread over all masters; scripts reloaded after SCRIPT FLUSH; the client mode
detected or forced; seed nodes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import anyio
import pytest

from eventcore import Envelope, EventLog, RedisError, load_settings
from eventcore._keys import Keys
from eventcore._redis import is_cluster
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import LocalCluster, RedisServer, free_port
from eventcore.testing.invariants import check_log, read_all


def _session_per_shard(log: EventLog) -> dict[int, str]:
    """One session id in each shard."""
    out: dict[int, str] = {}
    i = 0
    while len(out) < log.keys.shards:
        out.setdefault(log.keys.shard_of(f"c-{i}"), f"c-{i}")
        i += 1
    return out


def test_the_shards_are_spread_over_all_masters(redis_cluster: LocalCluster) -> None:
    keys = load_settings(redis_url=redis_cluster.url, shards=16).keys()
    owners: dict[int, set[int]] = defaultdict(set)
    for shard in keys.all_shards():
        # every key of a shard is in one slot: its stream, meta, feed, dispatch
        sid = next(f"x{i}" for i in range(10_000) if keys.shard_of(f"x{i}") == shard)
        k = keys.session(sid)
        slots = {redis_cluster.keyslot(name) for name in
                 (*k.per_session, k.feed, k.dispatch, k.incarnation, keys.delayed(shard))}
        assert len(slots) == 1, f"shard {shard} spans slots {slots}"
        owners[redis_cluster.node_of_slot(slots.pop()).port].add(shard)
    assert sorted(owners) == sorted(n.port for n in redis_cluster.masters())
    assert all(len(shards) >= 3 for shards in owners.values()), owners


async def test_cluster_mode_is_detected(cluster_event_log: EventLog) -> None:
    assert is_cluster(cluster_event_log.redis)
    info = await cluster_event_log.redis.info("cluster")
    assert info["cluster_enabled"] == 1  # INFO goes to one node


async def test_every_operation_on_every_shard(
    cluster_event_log: EventLog, redis_cluster: LocalCluster
) -> None:
    log = cluster_event_log
    by_shard = _session_per_shard(log)
    masters = {redis_cluster.node_of_slot(redis_cluster.keyslot(log.keys.feed(shard))).port
               for shard in by_shard}
    assert len(masters) == 3  # the sessions below live on every master
    for shard, sid in by_shard.items():
        info = await log.create_session("agent", session_id=sid, labels={"s": str(shard)},
                                        input={"q": shard})
        assert info.last_seq == 2 and info.incarnation
        assert (await log.create_session("agent", session_id=sid)).incarnation == \
            info.incarnation  # again: the same session
        r = await log.emit(sid, "message", {"n": 1}, event_key="m1")
        assert r.seq == 3
        assert (await log.emit(sid, "message", {"n": 1}, event_key="m1")).duplicate
        many = await log.append_many(
            [Envelope(type="log", session_id=sid, payload=i) for i in range(5)])
        assert [x.seq for x in many] == [4, 5, 6, 7, 8]
        big = await log.emit(sid, "message", "x" * 100_000)  # a blob, in the shard's slot
        assert big.seq == 9
        await log.signal(sid, "status", {"v": shard})
        assert (await log.latest_signals(sid))["status"].payload["value"] == {"v": shard}
        assert len(await log.replay_signals(sid)) == 1
        runs = 0

        async def work(shard: int = shard) -> dict[str, int]:
            nonlocal runs
            runs += 1
            return {"shard": shard}

        assert await log.effect(sid, "charge", work) == {"shard": shard}
        assert await log.effect(sid, "charge", work) == {"shard": shard}
        assert runs == 1 and set(await log.effects(sid)) == {"charge"}
        full = await read_all(log, sid)
        check_log(full)
        assert full[8].payload == "x" * 100_000
        assert await log.read(sid, len(full)) == []  # at the tail: the one-slot transaction
        assert await log.last_seq(sid) == len(full)
        ended = await log.end_session(sid)
        assert (await log.get_session(sid)).state == "ended"
        assert (await log.end_session(sid)).seq == ended.seq
    incs = await log.incarnations(list(by_shard.values()))  # one pipeline over all masters
    assert all(incs.values())
    for sid in by_shard.values():
        assert await log.delete_session(sid)
        assert await log.read(sid) == []
        assert not await log.delete_session(sid)


async def test_concurrent_appends_over_all_masters(cluster_event_log: EventLog) -> None:
    log = cluster_event_log
    sids = [(await log.create_session()).session_id for _ in range(24)]
    assert len({log.keys.shard_of(s) for s in sids}) > 8

    async def producer(p: int) -> None:
        for i in range(30):
            await log.emit(sids[(p + i) % len(sids)], "m", [p, i], event_key=f"{p}.{i}")

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for p in range(16):
                tg.start_soon(producer, p)
    total = 0
    for sid in sids:
        full = await read_all(log, sid)
        check_log(full)
        total += len(full) - 1
    assert total == 16 * 30


async def test_scripts_reloaded_after_script_flush(
    cluster_event_log: EventLog, redis_cluster: LocalCluster
) -> None:
    log = cluster_event_log
    by_shard = _session_per_shard(log)
    for sid in by_shard.values():
        await log.create_session(session_id=sid)
        await log.effect(sid, "e", _one)
    for node in redis_cluster.masters():
        assert node.command("SCRIPT", "FLUSH") == "OK"
    for sid in by_shard.values():  # every master lost every script: each call reloads
        assert (await log.emit(sid, "m", 1)).seq == 3
        assert await log.effect(sid, "e2", _one) == 1
        assert await log.delete_session(sid)


async def _one() -> int:
    return 1


async def test_mode_forced(redis_cluster: LocalCluster, redis_server: RedisServer) -> None:
    ns = unique_namespace()
    async with EventLog(redis_url=redis_cluster.url, redis_mode="cluster", namespace=ns) as log:
        assert is_cluster(log.redis)
    async with EventLog(redis_url=redis_server.url, namespace=ns) as log:
        assert not is_cluster(log.redis)  # auto, on a single node
    with pytest.raises(RedisError, match=r"[Cc]luster mode is not enabled"):
        async with EventLog(redis_url=redis_server.url, redis_mode="cluster", namespace=ns):
            pass
    # forced single against a cluster node: keys of other masters answer MOVED, at start
    owner = redis_cluster.node_of_slot(redis_cluster.keyslot(Keys(ns).shard_count()))
    other = next(n for n in redis_cluster.masters() if n is not owner)
    with pytest.raises(RedisError, match=r"MOVED .* a Redis Cluster node answered a single-node"):
        async with EventLog(redis_url=other.url, redis_mode="single",
                            namespace=ns, shards=16):
            pass


async def test_seed_nodes(redis_cluster: LocalCluster) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    seeds = ",".join(redis_cluster.addresses[1:])
    async with EventLog(redis_url=dead, redis_cluster_nodes=seeds,
                        namespace=unique_namespace(), retry_budget_s=2) as log:
        assert is_cluster(log.redis)
        s = await log.create_session()
        assert (await log.emit(s.session_id, "m", 1)).seq == 2


async def test_auto_mode_where_info_is_denied(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Some managed services deny INFO: auto mode then takes the server for a single node."""
    server = redis_server_factory()
    assert server.command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all",
                          "-info") == "OK"
    url = server.url.replace("redis://", "redis://app:pw@")
    async with EventLog(redis_url=url, namespace=unique_namespace()) as log:
        assert not is_cluster(log.redis)
        s = await log.create_session()
        assert (await log.emit(s.session_id, "m", 1)).seq == 2


async def test_tail_follows_live_on_every_master(cluster_event_log: EventLog) -> None:
    log = cluster_event_log
    by_shard = _session_per_shard(log)
    seen: dict[str, list[int]] = {sid: [] for sid in by_shard.values()}
    following = {sid: anyio.Event() for sid in by_shard.values()}

    async def follow(sid: str) -> None:
        async for env in log.tail(sid, block_ms=200):
            seen[sid].append(env.seq)
            if env.seq == 1:
                following[sid].set()  # caught up: what comes next is live

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for sid in by_shard.values():
                await log.create_session(session_id=sid)
                tg.start_soon(follow, sid)
            for sid in by_shard.values():
                await following[sid].wait()
                for i in range(3):
                    await log.emit(sid, "m", i)
                await log.end_session(sid)
    assert all(seqs == [1, 2, 3, 4, 5] for seqs in seen.values()), seen
