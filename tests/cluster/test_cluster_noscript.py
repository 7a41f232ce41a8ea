"""NOSCRIPT after SCRIPT FLUSH (a promoted master has an empty script cache): a pipelined
:func:`run_scripts` heals on its first reload, on a cluster and on a single node alike."""

from __future__ import annotations

import logging

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
