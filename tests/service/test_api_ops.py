"""Operability against the real server: metrics, health and readiness (Redis down and back),
slow and vanished clients, tokens kept out of the logs."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from service_support import API_KEY, Proc, Service

from eventcore import Envelope, EventLog, load_settings
from eventcore.testing._server import RedisServer


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            return float(value)
    return None


async def wait_metric(c: httpx.AsyncClient, ok: Callable[[str], bool]) -> str:
    with anyio.fail_after(30):
        while True:
            text = (await c.get("/metrics")).text
            if ok(text):
                return text
            await anyio.sleep(0.1)  # metrics are a poll-only interface


async def test_metrics_health_and_token_redaction(service: Service) -> None:
    sid, token = await service.create("echo")
    async with service.client() as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200
        assert set(ready.json()["checks"]) == {"redis", "scripts", "hub", "groups"}
        await c.post(f"/v1/sessions/{sid}/inputs", json={"payload": {"text": "m"}})
        read = (await c.post(f"/v1/sessions/{sid}/tokens", json={"scope": "read"})).json()
        got = []
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events",
                                params={"access_token": read["token"]}) as src:
            async for e in src.aiter_sse():
                got.append(e)
                if len(got) == 2:
                    break
        # the SSE request is counted once the server has noticed the client leave
        text = await wait_metric(c, lambda t: metric(
            t, "eventcore_subscriber_lag", group="projector") is not None and metric(
            t, "eventcore_http_requests_total", method="GET",
            route="/v1/sessions/{session_id}/events") is not None)
    assert metric(text, "eventcore_http_requests_total", method="POST", route="/v1/sessions",
                  status="201") == 1.0
    assert metric(text, "eventcore_http_requests_total", method="GET",
                  route="/v1/sessions/{session_id}/events", status="200") == 1.0
    assert (metric(text, "eventcore_sse_events_sent_total") or 0) >= 2
    assert metric(text, "eventcore_append_seconds_count", type="input") == 1.0
    assert metric(text, "eventcore_hub_watched_sessions") is not None
    log = service.api.log_tail()
    assert read["token"] not in log and token not in log and API_KEY not in log
    assert "access_token=[redacted]" in log


async def test_slow_and_vanished_clients(service: Service, service_log: EventLog) -> None:
    """A client that stops reading is closed after the send timeout; one that hangs up is
    noticed at once; neither holds back a client that reads."""
    sid, token = await service.create("echo")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", service.api.port or 0))
    slow.sendall(f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: t\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    big = "x" * 32 * 1024
    n = 200
    async with service.client(token) as c:
        await wait_metric(c, lambda t: metric(t, "eventcore_sse_clients") == 1.0)
        seen: list[int] = []

        async def reader() -> None:
            async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as src:
                async for e in src.aiter_sse():
                    seen.append(int(e.id))
                    if int(e.id) == n + 1:
                        return

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            for i in range(n):
                await service_log.append(Envelope(type="blob", session_id=sid,
                                                  payload={"i": i, "x": big}))
        assert seen == list(range(1, n + 2))
        text = await wait_metric(c, lambda t: (metric(t, "eventcore_sse_slow_closed_total")
                                               or 0) >= 1)
        assert metric(text, "eventcore_sse_clients") == 0.0
        slow.close()

        # a client that hangs up is forgotten promptly
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events",
                                headers={"Last-Event-ID": str(n + 1)}):
            await wait_metric(c, lambda t: metric(t, "eventcore_sse_clients") == 1.0)
        await wait_metric(c, lambda t: metric(t, "eventcore_sse_clients") == 0.0)


@pytest.mark.redis_restart
async def test_redis_outage_readiness_and_stream_resume(
    redis_server_factory: Callable[..., RedisServer], service_env: dict[str, str],
    tmp_path: Any,
) -> None:
    redis = redis_server_factory()
    env = {**service_env, "EVENTCORE_REDIS_URL": redis.url}
    svc = Service(env, tmp_path)
    svc.api = Proc("api", env, svc.api.port, tmp_path)
    svc.procs = [svc.api]
    svc.api.start()
    settings = load_settings(redis_url=redis.url, namespace=env["EVENTCORE_NAMESPACE"],
                             shards=4, retry_budget_s=20)
    try:
        sid, token = await svc.create("echo")
        async with EventLog(settings) as log, svc.client(token) as c:
            seen: list[int] = []
            got_first = anyio.Event()

            async def follow() -> None:
                async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as src:
                    async for e in src.aiter_sse():
                        seen.append(int(e.id))
                        got_first.set()
                        if int(e.id) == 4:
                            return

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follow)
                    await got_first.wait()
                    redis.kill()
                    down = await c.get("/readyz")
                    assert down.status_code == 503
                    assert down.json()["checks"]["redis"]["ok"] is False
                    redis.start()  # same port, same AOF: the session survived
                    await log.append(Envelope(type="input", session_id=sid, payload=1))
                    with anyio.fail_after(30):
                        while True:
                            if (await c.get("/readyz")).status_code == 200:
                                break
                            await anyio.sleep(0.1)  # readiness is a poll-only interface
                    await log.append(Envelope(type="input", session_id=sid, payload=2))
                    await log.append(Envelope(type="input", session_id=sid, payload=3))
            assert seen == [1, 2, 3, 4]
    finally:
        svc.api.stop()


async def test_metrics_can_require_the_api_key(service_env: dict[str, str],
                                               tmp_path: Any) -> None:
    svc = Service({**service_env, "EVENTCORE_METRICS_AUTH": "true"}, tmp_path)
    svc.api.start()
    try:
        _, token = await svc.create("echo")
        async with svc.client(None) as anonymous, svc.client(token) as session, \
                svc.client() as admin:
            denied = await anonymous.get("/metrics")
            assert denied.status_code == 401
            assert denied.headers["content-type"] == "application/problem+json"
            assert (await session.get("/metrics")).status_code == 403
            assert (await anonymous.get("/metrics", params={"access_token": token})
                    ).status_code == 401
            ok = await admin.get("/metrics")
            assert ok.status_code == 200 and "eventcore_http_requests_total" in ok.text
            assert (await anonymous.get("/healthz")).status_code == 200
    finally:
        svc.api.stop()
