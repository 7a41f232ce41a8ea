"""``eventcore.client`` against a real API process: every call, typed answers and errors,
every event type, idempotent inputs, the token-refresh hook, ``session.deleted``, and a stream
that resumes across graceful and crashing server restarts with no gap and no duplicate."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from service_support import API_KEY, Service

from eventcore import (
    EventcoreError,
    EventLog,
    SessionEnded,
    SessionNotFound,
    ValidationError,
    load_settings,
)
from eventcore.client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionLost,
    Envelope,
    Forbidden,
    InvalidRequest,
    NotFound,
    SessionDeleted,
    StreamItem,
    Unauthorized,
    decode_payload,
)
from eventcore.testing._server import RedisServer, free_port

DEADLINE = 90


class Collector:
    """Runs ``client.events`` in a task; ``reached(seq)`` waits for an envelope."""

    def __init__(self, client: AsyncClient, sid: str, **kwargs: Any) -> None:
        self.client, self.sid, self.kwargs = client, sid, kwargs
        self.items: list[StreamItem] = []
        self._changed = anyio.Event()
        self.done = anyio.Event()

    @property
    def seqs(self) -> list[int]:
        return [i.seq for i in self.items if isinstance(i, Envelope)]

    async def run(self) -> None:
        try:
            async for item in self.client.events(self.sid, **self.kwargs):
                self.items.append(item)
                self._changed.set()
                self._changed = anyio.Event()
        finally:
            self.done.set()

    async def reached(self, seq: int) -> None:
        while not self.seqs or self.seqs[-1] < seq:
            await self._changed.wait()


async def test_calls_answer_typed_and_inputs_are_idempotent(service: Service,
                                                            service_log: EventLog) -> None:
    async with AsyncClient(service.url, API_KEY) as c:
        s = await c.create_session("echo", metadata={"team": "a"}, idempotency_key="k1")
        again = await c.create_session("echo", idempotency_key="k1")
        assert again.session_id == s.session_id and s.stream == f"session/{s.session_id}"
        first = await c.send_input(s.session_id, {"text": "hi"}, idempotency_key="i-1")
        dup = await c.send_input(s.session_id, {"text": "other"}, idempotency_key="i-1")
        assert dup.duplicate and dup.seq == first.seq and not first.duplicate
        sig = await c.send_signal(s.session_id, "status", {"p": 1})
        assert [e.payload for e in await c.signals(s.session_id)] == [{"key": "status",
                                                                       "value": {"p": 1}}]
        state = await c.get_session(s.session_id)
        assert (state.agent, state.labels, state.last_seq) == ("echo", {"team": "a"}, sig.seq)
        page = await c.history(s.session_id)
        assert [e.type for e in page.events] == ["session.created", "input", "signal"]
        assert page.next_after == sig.seq
        assert decode_payload(page.events[0]).labels == {"team": "a"}
        read = await c.get_token(s.session_id, scope="read", ttl_s=60)
        assert read.scope == "read" and 0 < read.expires_in <= 60
        cancel = await c.cancel(s.session_id, reason="enough")
        assert cancel.seq == sig.seq + 1
        (ev,) = await service_log.read(s.session_id, after=sig.seq)
        assert ev.type == "control.cancel"
        # the input's key became its event key: the retry of a retry is still one input
        (inp,) = [e for e in await service_log.read(s.session_id) if e.type == "input"]
        assert inp.event_key == "input:i-1" and inp.payload == {"text": "hi"}
        await c.delete_session(s.session_id)
        with pytest.raises(NotFound) as info:
            await c.get_session(s.session_id)
        assert isinstance(info.value, SessionNotFound) and info.value.status == 404

    # a made-up key per call: two sends are two inputs
    async with AsyncClient(service.url, API_KEY) as c:
        s2 = await c.create_session("echo")
        a = await c.send_input(s2.session_id, 1)
        b = await c.send_input(s2.session_id, 1)
        assert b.seq == a.seq + 1 and not b.duplicate


async def test_errors_are_typed_eventcore_errors(service: Service) -> None:
    async with AsyncClient(service.url, API_KEY) as admin:
        s = await admin.create_session("echo")
        read = (await admin.get_token(s.session_id, scope="read")).token
        with pytest.raises(InvalidRequest) as bad:
            await admin.send_signal(s.session_id, "", 1)
        assert isinstance(bad.value, ValidationError) and bad.value.status == 422
    async with AsyncClient(service.url, read) as reader:
        with pytest.raises(Forbidden) as forbidden:
            await reader.send_input(s.session_id, {"text": "no"})
        assert forbidden.value.status == 403 and isinstance(forbidden.value, EventcoreError)
    async with AsyncClient(service.url, "not-a-credential") as nobody:
        with pytest.raises(Unauthorized):
            await nobody.get_session(s.session_id)
        with pytest.raises(Unauthorized):
            async for _ in nobody.events(s.session_id):
                pass
    # nothing listens there: ConnectionLost once the reconnect budget is spent
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", API_KEY,
                           reconnect_timeout_s=0.5) as lost:
        with pytest.raises(ConnectionLost) as gone:
            await lost.get_session("x")
        assert gone.value.__cause__ is not None
        with pytest.raises(ConnectionLost):
            async for _ in lost.events("x"):
                pass


async def test_every_event_type_is_delivered_in_order(service: Service,
                                                      service_log: EventLog) -> None:
    types = ["message", "log", "custom.kind", "run.started", "tool.started", "tool.ended",
             "effect.like", "my-app/thing"]
    async with AsyncClient(service.url, API_KEY) as c:
        s = await c.create_session("echo")
        for t in types:
            await service_log.emit(s.session_id, t, {"t": t})
        await c.send_signal(s.session_id, "k", "v")
        await service_log.end_session(s.session_id)
        with anyio.fail_after(DEADLINE):
            got = [i async for i in c.events(s.session_id)]
        envs = [i for i in got if isinstance(i, Envelope)]
        assert envs == got
        assert [e.type for e in envs] == ["session.created", *types, "signal", "session.ended"]
        assert [e.seq for e in envs] == list(range(1, len(envs) + 1))
        assert all(e.server_data is None for e in envs)
        # resuming after a seq starts right after it; after the end there is nothing more
        tail = [i async for i in c.events(s.session_id, after=len(envs) - 2)]
        assert [e.seq for e in tail if isinstance(e, Envelope)] == [len(envs) - 1, len(envs)]
        assert [i async for i in c.events(s.session_id, after=len(envs))] == []
        only = [i async for i in c.events(s.session_id, types=["message", "session.ended"])]
        assert [e.type for e in only if isinstance(e, Envelope)] == ["message", "session.ended"]


@pytest.mark.own_api
async def test_the_stream_resumes_across_restarts_with_no_gap_and_no_duplicate(
    service: Service, service_log: EventLog
) -> None:
    async with AsyncClient(service.url, API_KEY, backoff_max_s=0.5) as c:
        s = await c.create_session("echo")
        sid = s.session_id
        col = Collector(c, sid)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(col.run)
                for i in range(5):
                    res = await service_log.emit(sid, "message", {"i": i})
                await col.reached(res.seq)
                # graceful: server.shutdown, then the API is down while events keep coming
                await anyio.to_thread.run_sync(service.api.stop)
                for i in range(5):
                    await service_log.emit(sid, "message", {"down": i})
                await anyio.to_thread.run_sync(service.api.start)
                res = await service_log.emit(sid, "message", {"back": 1})
                await col.reached(res.seq)
                # a crash: nobody says goodbye
                await anyio.to_thread.run_sync(lambda: service.api.stop(signal.SIGKILL))
                for i in range(3):
                    await service_log.emit(sid, "log", {"crashed": i})
                await anyio.to_thread.run_sync(service.api.start)
                await service_log.end_session(sid)
                await col.done.wait()
        total = 1 + 5 + 5 + 1 + 3 + 1
        assert col.seqs == list(range(1, total + 1))  # no gap, no duplicate, in order
        assert isinstance(col.items[-1], Envelope) and col.items[-1].type == "session.ended"


async def test_the_refresh_hook_renews_an_expiring_stream_token(
    service: Service, service_log: EventLog
) -> None:
    """A stream opened with a session token ends at its expiry with ``token.expired``: the
    client asks the hook for a new one and resumes after the last seq; a request answered
    ``401`` is repeated once with the refreshed token."""
    async with AsyncClient(service.url, API_KEY) as admin:
        s = await admin.create_session("echo")
        sid = s.session_id
        minted: list[str] = []

        async def refresh() -> str:
            minted.append((await admin.get_token(sid, scope="rw", ttl_s=2)).token)
            return minted[-1]

        short = (await admin.get_token(sid, scope="rw", ttl_s=1)).token
        async with AsyncClient(service.url, short, refresh_token=refresh) as c:
            col = Collector(c, sid)
            with anyio.fail_after(DEADLINE):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(col.run)
                    n = 1
                    while len(minted) < 3:  # three expiries in a row, events between them
                        n = (await service_log.emit(sid, "message", {"n": n})).seq
                        await col.reached(n)
                        await anyio.sleep(0.3)  # let time pass toward the token's expiry
                    assert c.token == minted[-1]
                    # a stale token on a plain request: 401, refresh, repeated once
                    c.token = short
                    late = await c.send_input(sid, {"text": "late"})
                    assert c.token == minted[-1] and len(minted) == 4
                    await service_log.end_session(sid)
                    await col.done.wait()
            assert col.seqs == list(range(1, late.seq + 2))  # no gap, no duplicate
    with pytest.raises(Conflict) as ended:
        async with AsyncClient(service.url, API_KEY) as admin:
            await admin.send_input(sid, {"text": "after the end"})
    assert isinstance(ended.value, SessionEnded)


async def test_a_deleted_session_ends_the_stream_with_session_deleted(
    service: Service, service_log: EventLog
) -> None:
    async with AsyncClient(service.url, API_KEY) as c:
        s = await c.create_session("echo")
        sid = s.session_id
        await service_log.emit(sid, "message", {"text": "old"})
        col = Collector(c, sid)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(col.run)
                await col.reached(2)
                await service_log.redis.delete(*service_log.keys.session(sid).per_session)
                await service_log.create_session("echo", session_id=sid)
                for i in range(4):
                    await service_log.emit(sid, "message", {"text": f"new {i}"})
                await col.done.wait()
        assert col.seqs == [1, 2]
        last = col.items[-1]
        assert isinstance(last, SessionDeleted) and last.session_id == sid


async def test_the_blocking_client(service: Service, service_log: EventLog) -> None:
    def use() -> tuple[list[str], int]:
        with Client(service.url, API_KEY) as c:
            s = c.create_session("echo")
            c.send_input(s.session_id, {"text": "x"}, idempotency_key="same")
            dup = c.send_input(s.session_id, {"text": "x"}, idempotency_key="same")
            c.send_signal(s.session_id, "k", 1)
            anyio.from_thread.run(service_log.end_session, s.session_id)
            types = [i.type for i in c.events(s.session_id) if isinstance(i, Envelope)]
            # leaving early closes the stream
            for item in c.events(s.session_id):
                assert isinstance(item, Envelope) and item.seq == 1
                break
            return types, dup.seq

    types, dup = await anyio.to_thread.run_sync(use)
    assert types == ["session.created", "input", "signal", "session.ended"]
    assert dup == 2


@pytest.mark.own_api
async def test_list_sessions(service: Service) -> None:
    async with AsyncClient(service.url, API_KEY) as c:
        s = await c.create_session("echo", metadata={"team": "z"})
        page = await c.list_sessions(agent="echo", limit=10)
        assert s.session_id in [row["session_id"] for row in page["sessions"]]
        assert "next_cursor" in page


@pytest.mark.redis_restart
async def test_the_stream_survives_a_redis_restart(
    redis_server_factory: Callable[..., RedisServer], service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Redis goes away under the API (readiness fails, the hub and the stream retry or drop
    the client) and comes back on the same port with its AOF: the client goes on with no gap
    and no duplicate."""
    redis = redis_server_factory()
    env = {**service_env, "EVENTCORE_REDIS_URL": redis.url}
    svc = Service(env, tmp_path)
    svc.api.start()
    settings = load_settings(redis_url=redis.url, namespace=env["EVENTCORE_NAMESPACE"],
                             shards=4, retry_budget_s=20)
    try:
        async with EventLog(settings) as log, AsyncClient(svc.url, API_KEY,
                                                          backoff_max_s=0.5) as c:
            s = await c.create_session("echo")
            sid = s.session_id
            col = Collector(c, sid)
            with anyio.fail_after(DEADLINE):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(col.run)
                    for i in range(3):
                        res = await log.emit(sid, "message", {"i": i})
                    await col.reached(res.seq)
                    await anyio.to_thread.run_sync(redis.restart)  # graceful: AOF kept
                    for i in range(3):
                        await log.emit(sid, "message", {"after": i})
                    await log.end_session(sid)
                    await col.done.wait()
            assert col.seqs == list(range(1, 9))
    finally:
        svc.api.stop()
