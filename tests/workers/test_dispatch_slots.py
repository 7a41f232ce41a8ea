"""The dispatch read and its slots: a worker with free slots leaves no dispatch entry
undelivered or unclaimed (issue 8: sessions created but never hosted)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
from workers_support import dispatch_state, hosted_within

from eventcore import EventLog
from workers import Worker

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
