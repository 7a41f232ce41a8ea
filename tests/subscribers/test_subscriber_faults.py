"""Faults against real servers: a subscriber process SIGKILLed mid-batch, Redis flushed and
restarted, PostgreSQL unreachable or its connections killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from subscriber_helpers import (
    PG_URL,
    AppliedLog,
    TcpProxy,
    all_keys,
    assert_applied_once_in_order,
    fast,
    populate,
)

from eventcore import EventLog, load_settings
from eventcore.subscribers import Persistence, Projector, SubscriberRunner, fold, read_view
from eventcore.testing._server import RedisServer
from eventcore.testing.invariants import read_all

CHILD = Path(__file__).with_name("sigkill_child.py")


def dedicated_log(server: RedisServer, shards: int = 4) -> EventLog:
    return EventLog(load_settings(redis_url=server.url, namespace=f"t{uuid.uuid4().hex[:8]}",
                                  shards=shards, retry_budget_s=20))


async def test_sigkilled_subscriber_process_entries_are_reclaimed_and_applied_once(
    event_log: EventLog,
) -> None:
    last = await populate(event_log, 6, 12)
    witness = AppliedLog(event_log)
    await SubscriberRunner(event_log, witness).ensure_groups()
    url = event_log.settings.redis_url
    assert url is not None
    async with await anyio.open_process(
        [sys.executable, str(CHILD), url, event_log.settings.namespace,
         str(event_log.settings.shards)],
        stderr=subprocess.STDOUT,
    ) as child:
        assert child.stdout is not None
        line = b""
        with anyio.fail_after(30):
            async for chunk in child.stdout:
                line += chunk
                if b"\n" in line:
                    break
        assert line.startswith(b"MID "), line
        _, batch, half = line.split()
        child.send_signal(signal.SIGKILL)  # mid-batch: half applied, nothing acknowledged
        assert await child.wait() == -signal.SIGKILL
    applied_by_child = await witness.applications()
    assert len(applied_by_child) == int(half) > 0
    pending = [await event_log.redis.xpending(event_log.keys.feed(s), "exact")
               for s in event_log.keys.all_shards()]
    assert sum(p["pending"] for p in pending) == int(batch)
    assert {c["name"] for p in pending for c in p["consumers"]} == {b"child"}

    runner = SubscriberRunner(event_log, witness, **fast(claim_idle_ms=400, claim_interval_ms=50))
    async with runner:
        with anyio.fail_after(30):
            await runner.wait_until(lambda m: m.acked >= len(all_keys(last)))
    assert runner.metrics.reclaimed == int(batch)
    assert witness.stats.duplicates >= int(half)  # the child's half was not applied again
    assert_applied_once_in_order(await witness.applications(), last)
    assert (await runner.refresh_metrics()).pending == 0


@pytest.mark.redis_restart
async def test_redis_flushed_group_recreated_from_checkpoint(
    redis_server_factory: Callable[..., RedisServer], sqlite_url: str
) -> None:
    server = redis_server_factory()
    async with dedicated_log(server) as log, Persistence(log, sqlite_url) as store:
        runner = SubscriberRunner(log, store, checkpoints=store, **fast(block_ms=1000))
        async with runner:
            a = await populate(log, 3, 5)
            with anyio.fail_after(20):
                # acknowledged, not only applied (the ack follows the store's commit): the
                # checkpoint is what the group acknowledged
                await runner.wait_until(lambda m: store.stats.applied >= len(all_keys(a))
                                        and m.acked >= len(all_keys(a)))
                await runner.refresh_metrics()  # checkpoint saved (Redis and the store)
            # a shard with entries (one none of a's sessions hashed to has nothing to save)
            shard = log.keys.shard_of(next(iter(a)))
            assert await store.load_checkpoint("persistence", shard) is not None
            await log.redis.flushall()  # while the runner is blocked on the feeds
            b = await populate(log, 3, 5)
            want = len(all_keys(a)) + len(all_keys(b))
            with anyio.fail_after(20):
                await runner.wait_until(lambda m: store.stats.applied >= want)
        assert runner.metrics.nogroup_recoveries >= 1
        # Flushed while the subscriber was down: the feed comes back (without the group) with
        # the next append; the group is recreated at the checkpoint, so nothing is skipped
        # (a group created at "$" would miss everything appended before it).
        await log.redis.flushall()
        c = await populate(log, 2, 4)
        await runner.drain()
        for sid, top in (a | b | c).items():
            assert [e.seq for e in await store.read(sid, 0, 100)] == list(range(1, top + 1))
        assert store.stats.applied == len(all_keys(a | b | c))  # nothing applied twice
        assert await store.count() == len(all_keys(a | b | c))


@pytest.mark.redis_restart
@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_redis_restart_nothing_skipped_nothing_twice(
    redis_server_factory: Callable[..., RedisServer], hard: bool
) -> None:
    server = redis_server_factory()  # AOF with fsync always: a restart loses nothing
    async with dedicated_log(server) as log:
        witness, projector = AppliedLog(log), Projector(log)
        async with (
            SubscriberRunner(log, witness, **fast()) as r1,
            SubscriberRunner(log, projector, **fast()) as r2,
        ):
            a = await populate(log, 3, 6)
            with anyio.fail_after(20):
                await r1.wait_until(lambda m: m.acked >= len(all_keys(a)))
            await anyio.to_thread.run_sync(lambda: server.restart(hard=hard))
            b = await populate(log, 3, 6)
            want = len(all_keys(a)) + len(all_keys(b))
            with anyio.fail_after(30):
                await r1.wait_until(lambda m: m.acked >= want)
                await r2.wait_until(lambda m: projector.stats.applied >= want)
        assert_applied_once_in_order(await witness.applications(), a | b)
        for sid in a | b:
            assert await read_view(log, sid) == fold(await read_all(log, sid))


@pytest.mark.postgres
async def test_postgres_unreachable_persistence_backs_off_and_catches_up(
    event_log: EventLog, table_prefix: str
) -> None:
    async with TcpProxy(5432) as proxy:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/test"
        store = Persistence(event_log, url, prefix=table_prefix, backoff_s=(0.02, 0.3),
                            engine_options={"connect_args": {"timeout": 5}})
        async with store:
            try:
                runner = SubscriberRunner(event_log, store, **fast())
                async with runner:
                    a = await populate(event_log, 3, 5)
                    with anyio.fail_after(20):
                        await runner.wait_until(lambda m: store.stats.applied >= len(all_keys(a)))
                    proxy.cut()  # connections dropped, new ones refused
                    b = await populate(event_log, 3, 5)
                    with anyio.fail_after(20):
                        await runner.wait_until(lambda m: store.db_retries >= 3)
                    assert store.stats.applied == len(all_keys(a))
                    await proxy.restore()
                    want = len(all_keys(a)) + len(all_keys(b))
                    with anyio.fail_after(30):
                        await runner.wait_until(lambda m: store.stats.applied >= want)
                assert runner.metrics.dead_lettered == 0
                assert await store.count() == want
                assert await store.watermarks(list(a | b)) == a | b
            finally:
                await store.drop_tables()


@pytest.mark.postgres
async def test_postgres_connections_killed_persistence_carries_on(
    event_log: EventLog, table_prefix: str
) -> None:
    app = f"eventcore-test-{table_prefix}"
    store = Persistence(event_log, PG_URL, prefix=table_prefix, backoff_s=(0.02, 0.3),
                        engine_options={"connect_args": {"server_settings":
                                                         {"application_name": app}}})
    admin = create_async_engine(PG_URL)
    async with store:
        try:
            runner = SubscriberRunner(event_log, store, **fast())
            async with runner:
                a = await populate(event_log, 2, 5)
                with anyio.fail_after(20):
                    await runner.wait_until(lambda m: store.stats.applied >= len(all_keys(a)))
                async with admin.begin() as conn:
                    killed = (await conn.execute(sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :app"), {"app": app})).scalar()
                assert killed and killed >= 1
                b = await populate(event_log, 2, 5)
                want = len(all_keys(a)) + len(all_keys(b))
                with anyio.fail_after(30):
                    await runner.wait_until(lambda m: store.stats.applied >= want)
            assert await store.count() == want and runner.metrics.dead_lettered == 0
        finally:
            await store.drop_tables()
            await admin.dispose()
