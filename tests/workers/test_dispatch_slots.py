"""The dispatch read and its slots: a worker with free slots leaves no dispatch entry
undelivered or unclaimed (issue 8: sessions created but never hosted)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import anyio
import pytest
from workers_support import (
    dispatch_state,
    ended_reason,
    hosted_within,
    nothing_waits_for_a_free_slot,
    watching,
)

from eventcore import Envelope, EventLog, load_settings
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import RedisServer
from eventcore.workers import Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]


async def test_reclaim_taking_the_last_free_slots_does_not_stall_the_dispatch_read(
    event_log: EventLog, hosting: Hosting
) -> None:
    """Reclaim reserves up to 100 free slots while XAUTOCLAIM runs. With <= 100 free that was
    all of them: a dispatch read that looked at the slots meanwhile went to sleep waiting for
    one, and releasing the reservation never woke it. Only a hosted session ending did, so a
    worker of sessions that wait for input (concurrency a little above their number) stopped
    reading for good, the rest of the created sessions never hosted."""
    log, waves, per_wave = event_log, 10, 4
    async with hosting(log, concurrency=waves * per_wave + 3,
                       reclaim_interval_s=0.005) as w:  # reclaim runs all the time
        sids: list[str] = []
        for _ in range(waves):
            async with anyio.create_task_group() as tg:
                for _ in range(per_wave):
                    tg.start_soon(_create, log, sids)
            await hosted_within(w, sids, within=10)
        state = await dispatch_state(w)
        assert (state.lag, state.unhosted_pending) == (0, 0), state
        assert w.active == len(sids) == waves * per_wave


async def _create(log: EventLog, into: list[str]) -> None:
    into.append((await log.create_session("held")).session_id)


N = 24
# The invariant's bound: one feed poll interval of these workers (the read blocks 0.1 s and a
# claim takes a round trip; this is far above both and far below "never").
POLL_S = 2.0


async def _create_in_waves(log: EventLog, w: Worker, per_wave: int = 3) -> list[str]:
    """``N`` sessions a few at a time, the invariant checked after each wave (each wave is a
    chance for the dispatch read to look at the slots while another path holds them)."""
    sids: list[str] = []
    while len(sids) < N:
        async with anyio.create_task_group() as tg:
            for _ in range(per_wave):
                tg.start_soon(_create, log, sids)
        await nothing_waits_for_a_free_slot(w, POLL_S)
    return sids


async def _run_down(log: EventLog, w: Worker, sids: list[str], *, batch: int,
                    fault: Callable[[], Awaitable[None]] | None = None) -> None:
    """Answer hosted sessions ``batch`` at a time (``held`` ends on its first input) until
    every session was hosted and ended, checking the invariant after every change;
    ``fault`` runs once, half way."""
    async with watching(log) as feed:
        await nothing_waits_for_a_free_slot(w, POLL_S)
        answered: set[str] = set()
        while len(answered) < len(sids):
            if fault is not None and len(answered) >= len(sids) // 2:
                await fault()
                fault = None
                await nothing_waits_for_a_free_slot(w, POLL_S)
            now = [sid for sid in sids if sid in w._hosts and sid not in answered][:batch]
            assert now, await dispatch_state(w)  # the invariant said some must be hosted
            for sid in now:
                await log.append(Envelope(type="input", session_id=sid, payload="bye"))
            answered.update(now)
            await feed.until(lambda now=now: all(feed.count(s, "session.ended") == 1
                                                 for s in now))
            await nothing_waits_for_a_free_slot(w, POLL_S)
        for sid in sids:
            assert [ended_reason(e) for e in feed.of(sid, "session.ended")] == ["completed"]
    assert w.metrics.lost == 0
    state = await dispatch_state(w)
    assert (state.lag, state.pending, state.hosted) == (0, 0, 0), state


@pytest.mark.parametrize("shards", [1, 16, 64])
@pytest.mark.parametrize("concurrency", [N + 4, N // 3],
                         ids=["above-sessions", "below-sessions"])
async def test_no_dispatch_entry_waits_while_a_slot_is_free(
    redis_url: str, hosting: Hosting, shards: int, concurrency: int
) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=shards)
    async with EventLog(settings) as log, hosting(
            log, concurrency=concurrency, reclaim_interval_s=0.02,
            poll_interval_s=POLL_S) as w:
        sids = await _create_in_waves(log, w)
        await _run_down(log, w, sids, batch=5)
        assert w.metrics.claims == N  # each session hosted once: nothing taken twice


@pytest.mark.redis_restart
async def test_no_dispatch_entry_waits_while_a_slot_is_free_across_a_redis_restart(
    redis_server_factory: Callable[..., RedisServer], hosting: Hosting
) -> None:
    """SIGKILL and restart (AOF, fsync always) with sessions hosted and more waiting for a
    slot: the read, the claims and the feed carry on, every session is hosted and answered."""
    server = redis_server_factory()
    settings = load_settings(redis_url=server.url, namespace="restart", shards=16,
                             retry_budget_s=10)

    async def sigkill_and_restart() -> None:
        await anyio.to_thread.run_sync(lambda: server.restart(hard=True))

    async with EventLog(settings) as log, hosting(
            log, concurrency=N // 2, reclaim_interval_s=0.02, poll_interval_s=POLL_S) as w:
        sids = await _create_in_waves(log, w)
        await _run_down(log, w, sids, batch=5, fault=sigkill_and_restart)
