"""The shard count is part of the deployment: recorded at the first start, and a process with
another ``EVENTCORE_SHARDS`` refuses to start (on a single node and on a cluster alike)."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest

from eventcore import ConfigError, EventLog, load_settings
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import LocalCluster, RedisServer


@pytest.fixture(params=["single", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    return cluster.url


async def test_another_shard_count_is_refused(url: str) -> None:
    ns = unique_namespace()
    async with EventLog(redis_url=url, namespace=ns, shards=16) as first:
        s = await first.create_session()
        assert int(await first.redis.get(first.keys.shard_count())) == 16
        with pytest.raises(ConfigError) as refused:
            async with EventLog(redis_url=url, namespace=ns, shards=4):
                pass
        message = str(refused.value)
        assert "EVENTCORE_SHARDS is 4" in message and "created with 16 shards" in message
        assert repr(ns) in message
        # the same count starts, and sees the first process's sessions
        async with EventLog(redis_url=url, namespace=ns, shards=16) as again:
            assert (await again.get_session(s.session_id)).last_seq == 1
        # the refused start changed nothing
        assert int(await first.redis.get(first.keys.shard_count())) == 16
    # another namespace is another deployment, with a count of its own
    async with EventLog(redis_url=url, namespace=unique_namespace(), shards=4) as other:
        assert int(await other.redis.get(other.keys.shard_count())) == 4


async def test_a_client_given_to_the_log_is_checked_too(url: str) -> None:
    ns = unique_namespace()
    async with EventLog(redis_url=url, namespace=ns, shards=8) as first:
        log = EventLog(load_settings(namespace=ns, shards=2), redis=first.redis)
        with pytest.raises(ConfigError, match="EVENTCORE_SHARDS is 2"):
            await log.start()


def test_the_shard_count_key_is_in_shard_0s_slot(redis_cluster: LocalCluster) -> None:
    keys = load_settings(namespace="ec").keys()
    assert keys.shard_count() == "ec:{0}:shards"
    assert redis_cluster.keyslot(keys.shard_count()) == redis_cluster.keyslot(keys.feed(0))


async def test_tail_with_another_shard_count_says_so(url: str) -> None:
    """What used to say "session does not exist" now names the mismatch."""
    ns = unique_namespace()
    async with EventLog(redis_url=url, namespace=ns, shards=16) as log:
        s = await log.create_session()
        env = {**os.environ, "EVENTCORE_REDIS_URL": url, "EVENTCORE_NAMESPACE": ns,
               "EVENTCORE_SHARDS": "4"}
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [sys.executable, "-c", "from eventcore.server._cli import main; main()",
                 "tail", s.session_id], env=env, check=False, stdin=subprocess.DEVNULL)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "EVENTCORE_SHARDS is 4" in err and "created with 16 shards" in err, err
    assert "does not exist" not in err
