"""The API server restarted (gracefully, then SIGKILLed) while SSE clients are connected: the
clients resume with Last-Event-ID and see every event exactly once, in order."""

from __future__ import annotations

import signal

import anyio
import httpx
from httpx_sse import aconnect_sse
from service_support import Service

from eventcore import Envelope, EventLog


class Follower:
    """An SSE client that reconnects like EventSource does: same URL, Last-Event-ID."""

    def __init__(self, service: Service, sid: str, token: str) -> None:
        self.service, self.sid, self.token = service, sid, token
        self.seen: list[int] = []
        self.shutdown_hints = 0
        self.connects = 0
        self._want = 0
        self._reached = anyio.Event()

    async def reached(self, seq: int) -> None:
        if self.seen and self.seen[-1] >= seq:
            return
        self._want, self._reached = seq, anyio.Event()
        await self._reached.wait()

    async def run(self, last_seq: int) -> None:
        url = f"/v1/sessions/{self.sid}/events"
        async with self.service.client(self.token) as c:
            while not self.seen or self.seen[-1] < last_seq:
                last = str(self.seen[-1]) if self.seen else "0"
                try:
                    async with aconnect_sse(c, "GET", url,
                                            headers={"Last-Event-ID": last}) as source:
                        if source.response.status_code != 200:
                            await anyio.sleep(0.05)  # e.g. 503 while starting: retry
                            continue
                        self.connects += 1
                        async for e in source.aiter_sse():
                            if e.event == "server.shutdown":
                                self.shutdown_hints += 1
                                assert e.retry is not None and e.retry > 0
                                continue
                            self.seen.append(int(e.id))
                            if self.seen[-1] >= self._want:
                                self._reached.set()
                            if self.seen[-1] >= last_seq:
                                return
                except (httpx.TransportError, httpx.RemoteProtocolError):
                    await anyio.sleep(0.05)  # the server is down: retry, like EventSource


async def append(log: EventLog, sid: str, n: int) -> int:
    res = None
    for i in range(n):
        res = await log.append(Envelope(type="input", session_id=sid, payload={"i": i}))
    assert res is not None
    return res.seq


async def test_clients_resume_across_server_restarts(
    service: Service, service_log: EventLog
) -> None:
    sid, token = await service.create("echo")
    followers = [Follower(service, sid, token) for _ in range(3)]
    total = 1 + 5 + 5 + 5 + 5 + 1
    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            for f in followers:
                tg.start_soon(f.run, total)
            seq = await append(service_log, sid, 5)
            for f in followers:
                await f.reached(seq)

            # graceful restart: streams end with a retry hint; events appended while the
            # server is down are delivered after it is back
            # (uvicorn re-raises the signal it shut down for, so the status is -SIGTERM)
            assert await anyio.to_thread.run_sync(service.api.stop) in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in service.api.log_tail()
            seq = await append(service_log, sid, 5)
            await anyio.to_thread.run_sync(service.api.start)
            seq = await append(service_log, sid, 5)
            for f in followers:
                await f.reached(seq)

            # crash: SIGKILL, nobody says goodbye
            await anyio.to_thread.run_sync(lambda: service.api.stop(signal.SIGKILL))
            seq = await append(service_log, sid, 5)
            await anyio.to_thread.run_sync(service.api.start)
            seq = await append(service_log, sid, 1)
            assert seq == total
    for f in followers:
        assert f.seen == list(range(1, total + 1))  # no gap, no duplicate, in order
        assert f.shutdown_hints == 1  # the graceful stop said so; the crash could not
        assert f.connects >= 3
