"""Redis SIGKILLed and restarted while hosted sessions are given inputs: every input is
answered. (Issue 8: once in ~25 runs one session still had unanswered inputs a minute later.
With fsync always, the soak below has not reproduced that in ~80 rounds; a restart that loses
acknowledged writes does it every time, see the second test.) ``EC_TEST_RESTART_ROUNDS``,
``EC_TEST_SESSIONS``, ``EC_TEST_PRODUCERS``, ``EC_TEST_RESTARTS``, ``EC_TEST_PAUSE_S``,
``EC_TEST_IDLE_S``, ``EC_TEST_POLL_S`` scale the soak."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest
from workers_support import watching

from eventcore import Envelope, EventLog, load_settings
from eventcore.errors import EventcoreError
from eventcore.testing._server import RedisServer
from eventcore.testing.invariants import check_log, read_all
from eventcore.workers import Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]
ROUNDS = int(os.environ.get("EC_TEST_RESTART_ROUNDS", "1"))
PAUSE_S = float(os.environ.get("EC_TEST_PAUSE_S", "0.01"))


async def _unanswered(log: EventLog, sids: list[str]) -> dict[str, list[int]]:
    """Per session, the inputs without their ``message`` (echo answers each input once)."""
    out = {}
    for sid in sids:
        events = await read_all(log, sid)
        answered = {int(e.run_id.split(".")[0][1:]) for e in events
                    if e.type == "message" and e.run_id}
        missing = [e.seq for e in events if e.type == "input" and e.seq not in answered]
        if missing:
            out[sid] = missing
    return out


def _host_state(w: Worker, sid: str) -> dict[str, Any]:
    s = w._hosts.get(sid)
    if s is None:
        return {"hosted": False}
    return {"hosted": True, "cursor": s.cursor, "known": s.known, "inflight": s.inflight,
            "fetching": s.fetching, "refetch": s.refetch, "dirty": s in w.feed._dirty,
            "inputs_queued": len(s._inputs), "waiting": s._wake is not None,
            "stop": s.stop_reason, "epoch": s.epoch}


@pytest.mark.slow
@pytest.mark.redis_restart
@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_every_input_is_answered_across_redis_sigkills_under_input_load(
    redis_server_factory: Callable[..., RedisServer], hosting: Hosting, round_: int
) -> None:
    server = redis_server_factory()
    settings = load_settings(redis_url=server.url, namespace="soak", shards=4,
                             retry_budget_s=15)
    rng = random.Random(round_)
    async with EventLog(settings) as log, hosting(
            log, poll_interval_s=float(os.environ.get("EC_TEST_POLL_S", "60")),
            idle_timeout_s=float(os.environ.get("EC_TEST_IDLE_S", "60"))) as w:
        sids = [(await log.create_session("echo", input="first")).session_id
                for _ in range(int(os.environ.get("EC_TEST_SESSIONS", "12")))]
        sent = 0

        async def produce(stop: anyio.Event) -> None:
            nonlocal sent
            while not stop.is_set():
                sid = rng.choice(sids)
                try:
                    await log.append(Envelope(type="input", session_id=sid, payload=f"m{sent}"))
                    sent += 1
                except EventcoreError:
                    pass  # Redis down longer than the retry budget: try again
                await anyio.sleep(rng.random() * PAUSE_S)

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(int(os.environ.get("EC_TEST_PRODUCERS", "4"))):
                tg.start_soon(produce, stop)
            for _ in range(int(os.environ.get("EC_TEST_RESTARTS", "2"))):
                await anyio.sleep(0.3 + rng.random() * 0.5)
                await anyio.to_thread.run_sync(lambda: server.restart(hard=True))
            await anyio.sleep(0.5)
            stop.set()
        missing: dict[str, list[int]] = {}
        with anyio.move_on_after(30):
            while missing := await _unanswered(log, sids):  # noqa: ASYNC110 - state in Redis
                await anyio.sleep(0.2)
        if missing:
            detail = {sid: {"unanswered": seqs, "seq": (await log.get_session(sid)).last_seq,
                            **_host_state(w, sid)} for sid, seqs in missing.items()}
            raise AssertionError(f"inputs unanswered 30 s after the last restart "
                                 f"({sent} sent): {detail}")
        for sid in sids:
            check_log(await read_all(log, sid))


@pytest.mark.redis_restart
async def test_a_hosted_session_whose_history_redis_lost_is_hosted_again(
    redis_server_factory: Callable[..., RedisServer], hosting: Hosting
) -> None:
    """Redis restarted without its latest acknowledged writes (here: from an older snapshot;
    in production fsync everysec -- the embedded server's policy -- or a failover to a replica
    that lagged). The session's seq went back below the host's read cursor: its next inputs
    get seqs the host believes it has read, so it never read them and never answered. The
    host must notice the stream went back, and the session be hosted again from its log."""
    server = redis_server_factory(appendonly=False)
    settings = load_settings(redis_url=server.url, namespace="rewind", shards=4,
                             retry_budget_s=10)
    async with EventLog(settings) as log, hosting(log, poll_interval_s=0.2) as w:
        async with watching(log) as feed:
            sid = (await log.create_session("echo", input="one")).session_id
            await feed.until(lambda: feed.count(sid, "run.completed") == 1)
            await log.redis.save()  # what the restarted server will have: one input answered
            await log.append(Envelope(type="input", session_id=sid, payload="two"))
            await feed.until(lambda: feed.count(sid, "run.completed") == 2)
        cursor = w._hosts[sid].cursor
        await anyio.to_thread.run_sync(lambda: server.restart(hard=True))
        assert (await log.get_session(sid)).last_seq < cursor  # the host read lost history
        await log.append(Envelope(type="input", session_id=sid, payload="three"))
        async with watching(log) as feed:
            await feed.until(lambda: [e.payload["text"] for e in feed.of(sid, "message")]
                             == ["ONE", "THREE"], within=20)
        check_log(await read_all(log, sid))
