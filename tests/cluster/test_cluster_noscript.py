"""NOSCRIPT after SCRIPT FLUSH (a promoted master has an empty script cache): a pipelined
:func:`run_scripts` heals on its first reload, on a cluster and on a single node alike."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio
import pytest

from eventcore._redis import open_redis, run_script, run_scripts
from eventcore.testing._server import LocalCluster, RedisServer

_SRC = "return redis.call('INCR', KEYS[1])"


async def _flushed_batch(url: str, flush: list[RedisServer],
                         caplog: pytest.LogCaptureFixture) -> None:
    client = await open_redis(url, retry_budget_s=5)
    try:
        script = client.register_script(_SRC)
        calls = [([f"noscript:{{k{i}}}"], []) for i in range(8)]
        assert await run_scripts(client, script, calls) == [1] * 8
        for node in flush:
            node.command("SCRIPT", "FLUSH")
        with caplog.at_level(logging.WARNING):
            assert await run_scripts(client, script, calls) == [2] * 8
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await client.aclose()


async def test_run_scripts_after_flush_on_every_master(
    redis_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    await _flushed_batch(redis_cluster.url, redis_cluster.masters(), caplog)


async def test_run_scripts_after_flush_single_node(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await _flushed_batch(redis_server.url, [redis_server], caplog)


async def _flushed_single_call(url: str, flush: list[RedisServer]) -> None:
    """The single-call path the workers' scripts (claim, started/ended, effects) use."""
    client = await open_redis(url, retry_budget_s=5)
    try:
        script = client.register_script(_SRC)
        assert await run_script(script, ["noscript:one"], []) == 1
        for node in flush:
            node.command("SCRIPT", "FLUSH")
        assert await run_script(script, ["noscript:one"], []) == 2
    finally:
        await client.aclose()


async def test_run_script_after_flush_on_every_master(redis_cluster: LocalCluster) -> None:
    await _flushed_single_call(redis_cluster.url, redis_cluster.masters())


async def test_run_script_after_flush_single_node(redis_server: RedisServer) -> None:
    await _flushed_single_call(redis_server.url, [redis_server])


async def test_two_redirections_of_one_slot_keep_its_new_master_a_primary(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    """After a failover, two commands in flight to the old master come back MOVED. redis-py
    5.3 applies the second redirection as if the slot's first node were still the old master:
    it marks the new master a replica (and lists it twice), so SCRIPT LOAD, which goes to the
    primaries, never reaches it and every script of its slots fails with NOSCRIPT for good
    (seen in CI: a worker's scripts failing 231 times in a row after a graceful failover)."""
    cluster = redis_cluster_factory(replicas=1, node_timeout_ms=2000)
    client = await open_redis(cluster.url, retry_budget_s=15)
    try:
        key = "moved:{x}"
        assert await client.set(key, "1")  # the slot map is read: the old master serves it
        victim = cluster.node_of_slot(cluster.keyslot(key))
        replica = cluster.replica_of(victim)
        await anyio.to_thread.run_sync(cluster.wait_synced)
        await anyio.to_thread.run_sync(cluster.promote, replica)
        # both sent to the old master before either redirection is applied
        got = await asyncio.gather(*(client.get(key) for _ in range(4)))
        assert got == [b"1"] * 4
        script = client.register_script("return redis.call('GET', KEYS[1])")  # loaded nowhere
        assert await run_script(script, [key], []) == b"1"
    finally:
        await client.aclose()
