"""The SSE stream against abusive clients, on a real API process: clients that stop reading
are disconnected at the transport and cost a bounded amount of memory whatever the history's
size; a stream opened with a session token ends at the token's expiry, and resuming with a
fresh token loses and repeats nothing."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import anyio
import httpx
import psutil
from httpx_sse import aconnect_sse
from service_support import Service
from test_api_ops import metric, wait_metric

from eventcore import Envelope, EventLog

MiB = 1024 * 1024


def _stalled_client(port: int, sid: str, token: str) -> socket.socket:
    """Connects and asks for the stream, then never reads (a tiny receive buffer, so the
    server's sends back up at once)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: t\r\n"
              f"Authorization: Bearer {token}\r\n\r\n".encode())
    return s


def _established_from(server: psutil.Process, ports: set[int]) -> int:
    return sum(1 for c in server.net_connections(kind="tcp")
               if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED)


def _drained_to_eof(s: socket.socket, deadline_s: float) -> bool:
    """Reads what is left; True if the connection ends (EOF or reset) before the deadline."""
    s.settimeout(0.5)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if not s.recv(1 << 16):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            continue
    return False


async def test_stalled_clients_are_disconnected_and_cost_no_more_than_their_buffer(
    service: Service, service_log: EventLog
) -> None:
    """A history of 256 events of 32 KiB (8 MiB) and 8 clients that never read. Before, each
    held its whole catch-up page several times over (~28 MiB) and, once past the send timeout,
    stayed ESTABLISHED with megabytes unsent for as long as it kept the socket open."""
    sid, token = await service.create("echo")
    big = "x" * 32 * 1024
    await service_log.append_many([Envelope(type="blob", session_id=sid, payload={"i": i, "x": big})
                                   for i in range(256)])
    last = 257
    api = psutil.Process(service.api.proc.pid if service.api.proc else 0)
    async with service.client(token) as c:
        # one client reads the whole history first: what any catch-up allocates for good is
        # in the baseline
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as src:
            async for e in src.aiter_sse():
                if e.id and int(e.id) == last:
                    break
        await wait_metric(c, lambda t: metric(t, "eventcore_sse_clients") == 0.0)
        baseline = api.memory_info().rss

        n = 8
        clients = [_stalled_client(service.api.port or 0, sid, token) for _ in range(n)]
        ports = {s.getsockname()[1] for s in clients}
        try:
            await wait_metric(c, lambda t: metric(t, "eventcore_sse_clients") == float(n))
            await _slow_clients_closed_within_memory(c, api, ports, baseline, baseline)
            for s in clients:
                assert await anyio.to_thread.run_sync(_drained_to_eof, s, 10.0)
        finally:
            for s in clients:
                s.close()
        text = (await c.get("/metrics")).text
        assert metric(text, "eventcore_sse_slow_closed_total") == float(n)
        assert metric(text, "eventcore_sse_clients") == 0.0
        # and a reading client is still served the whole history
        seen = []
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as src:
            async for e in src.aiter_sse():
                seen.append(int(e.id))
                if int(e.id) == last:
                    break
        assert seen == list(range(1, last + 1))


async def test_clients_that_stop_reading_while_live_are_bounded_and_others_get_everything(
    service: Service, service_log: EventLog
) -> None:
    """The live fast path (the hub's fan-out writing frames straight to each caught-up
    client's connection) stops writing to a client whose write buffer is full: then its
    bounded buffer, then catch-up at its own pace, then the send timeout, as for any stream.
    8 clients stop reading while live, 8 MiB are appended; a reading client of the same session
    gets every event once, in order."""
    sid, token = await service.create("echo")
    api = psutil.Process(service.api.proc.pid if service.api.proc else 0)
    n = 8
    big = "x" * 32 * 1024
    last = 257
    async with service.client(token) as c:
        baseline = api.memory_info().rss
        clients = [_stalled_client(service.api.port or 0, sid, token) for _ in range(n)]
        ports = {s.getsockname()[1] for s in clients}
        seen: list[int] = []
        try:
            async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as src:
                await wait_metric(c, lambda t: metric(t, "eventcore_sse_clients") == n + 1.0)
                peak = baseline
                async with anyio.create_task_group() as tg:
                    async def append() -> None:
                        for i in range(256):
                            await service_log.append(Envelope(type="blob", session_id=sid,
                                                              payload={"i": i, "x": big}))
                    tg.start_soon(append)
                    with anyio.fail_after(60):
                        async for e in src.aiter_sse():
                            if e.id:
                                seen.append(int(e.id))
                                peak = max(peak, api.memory_info().rss)
                                if int(e.id) == last:
                                    break
            assert seen == list(range(1, last + 1))
            await _slow_clients_closed_within_memory(c, api, ports, baseline, peak)
        finally:
            for s in clients:
                s.close()


async def _slow_clients_closed_within_memory(c: httpx.AsyncClient, api: psutil.Process,
                                             ports: set[int], baseline: int, peak: int) -> None:
    """Wait until the server has closed every stalled client (``ports``) as slow, sampling its
    memory meanwhile: bounded by the buffers (a few pages in flight per client), not by the
    history; then, past the send timeout, the server drops the connections itself."""
    n = len(ports)
    with anyio.fail_after(30):
        while (metric((await c.get("/metrics")).text,
                      "eventcore_sse_slow_closed_total") or 0) < n:
            peak = max(peak, api.memory_info().rss)
            await anyio.sleep(0.05)  # sampling memory: there is nothing to await
    assert peak - baseline < n * 6 * MiB, f"grew {(peak - baseline) / MiB:.0f} MiB"
    with anyio.fail_after(15):
        while True:
            if not _established_from(api, ports):
                break
            await anyio.sleep(0.1)  # the server's socket table is poll-only


def _exp(token: str) -> int:
    import base64

    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    exp: int = claims["exp"]
    return exp


async def test_a_stream_ends_at_its_tokens_expiry_and_resumes_exactly(
    service: Service, service_log: EventLog
) -> None:
    sid, _ = await service.create("echo")
    async with service.client() as admin:
        r = await admin.post(f"/v1/sessions/{sid}/tokens", json={"scope": "read", "ttl_s": 2})
        short = r.json()["token"]
    url = f"/v1/sessions/{sid}/events"
    expired: list[Any] = []
    first: list[int] = []
    admin_seen: list[int] = []
    stop_producing = anyio.Event()

    async def produce() -> None:
        i = 0
        while not stop_producing.is_set():
            await service_log.append(Envelope(type="message", session_id=sid, payload={"i": i}))
            i += 1
            await anyio.sleep(0.02)  # pacing a producer, not synchronising

    async def admin_reader() -> None:
        async with service.client() as c, aconnect_sse(c, "GET", url) as src:
            async for e in src.aiter_sse():
                assert e.event != "token.expired"
                admin_seen.append(int(e.id))
                if e.event == "session.ended":
                    return

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(admin_reader)
            tg.start_soon(produce)
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as c, \
                    aconnect_sse(c, "GET", url, params={"access_token": short}) as src:
                async for e in src.aiter_sse():
                    if e.event == "token.expired":
                        expired.append(json.loads(e.data))
                        continue  # the stream must end right after it
                    assert not expired, "an event after token.expired"
                    first.append(int(e.id))
            assert time.time() >= _exp(short)  # at the expiry, not before
            assert len(expired) == 1
            assert expired[0]["resume_after"] == first[-1]
            stop_producing.set()

            # resume with a fresh token from the last id seen
            async with service.client() as c:
                fresh = (await c.post(f"/v1/sessions/{sid}/tokens",
                                      json={"scope": "read"})).json()["token"]
            for i in range(3):
                await service_log.append(Envelope(type="message", session_id=sid,
                                                  payload={"after": i}))
            await service_log.end_session(sid)
            second: list[int] = []
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as c, \
                    aconnect_sse(c, "GET", url, params={"access_token": fresh},
                                 headers={"Last-Event-ID": str(first[-1])}) as src:
                async for e in src.aiter_sse():
                    second.append(int(e.id))
                    if e.event == "session.ended":
                        break
    last = await service_log.last_seq(sid)
    assert first + second == list(range(1, last + 1))
    assert admin_seen == list(range(1, last + 1))  # an API-key stream never expires
