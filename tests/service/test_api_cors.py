"""CORS against the real API process: preflights, real requests and the SSE stream from a page
on another origin, and the setting's validation."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from service_support import Service

from eventcore import ConfigError, load_settings

ALLOWED = "http://app.example.test:5173"
OTHER = "https://other.example.test"


@pytest.fixture
def cors_service(service_env: dict[str, str], tmp_path: Path) -> Service:
    env = {**service_env, "EVENTCORE_CORS_ORIGINS": f"{ALLOWED}, {OTHER}"}
    svc = Service(env, tmp_path)
    svc.api.start()
    return svc


async def _preflight(c: httpx.AsyncClient, path: str, origin: str, method: str,
                     headers: str) -> httpx.Response:
    return await c.options(path, headers={"Origin": origin,
                                          "Access-Control-Request-Method": method,
                                          "Access-Control-Request-Headers": headers})


async def test_allowed_origin_preflight_real_requests_and_sse(cors_service: Service) -> None:
    svc = cors_service
    try:
        sid, token = await svc.create("echo")
        async with svc.client(credential=None) as c:
            pre = await _preflight(c, f"/v1/sessions/{sid}/events", ALLOWED, "GET",
                                   "authorization, last-event-id")
            assert pre.status_code == 200, pre.text
            assert pre.headers["access-control-allow-origin"] == ALLOWED
            allowed = {h.strip().lower() for h in
                       pre.headers["access-control-allow-headers"].split(",")}
            assert {"authorization", "last-event-id", "content-type"} <= allowed
            assert "access-control-allow-credentials" not in pre.headers
            post = await _preflight(c, f"/v1/sessions/{sid}/inputs", OTHER, "POST",
                                    "authorization,content-type")
            assert post.status_code == 200, post.text
            assert post.headers["access-control-allow-origin"] == OTHER
            assert "POST" in post.headers["access-control-allow-methods"]

            auth = {"Authorization": f"Bearer {token}", "Origin": ALLOWED}
            got = await c.get(f"/v1/sessions/{sid}", headers=auth)
            assert got.status_code == 200
            assert got.headers["access-control-allow-origin"] == ALLOWED
            exposed = got.headers["access-control-expose-headers"].lower()
            assert "retry-after" in exposed and "www-authenticate" in exposed
            # errors are readable by the page too
            denied = await c.get(f"/v1/sessions/{sid}", headers={"Origin": ALLOWED})
            assert denied.status_code == 401
            assert denied.headers["access-control-allow-origin"] == ALLOWED
            sent = await c.post(f"/v1/sessions/{sid}/inputs", headers=auth,
                                json={"payload": {"text": "hi"}})
            assert sent.status_code in (200, 201), sent.text
            assert sent.headers["access-control-allow-origin"] == ALLOWED
            big = await c.post(f"/v1/sessions/{sid}/inputs", headers=auth,
                               content=b"x" * (128 * 1024))  # the edge's own 413
            assert big.status_code == 413
            assert big.headers["access-control-allow-origin"] == ALLOWED
            with anyio.fail_after(20):
                async with c.stream("GET", f"/v1/sessions/{sid}/events",
                                    headers={**auth, "Last-Event-ID": "0"}) as sse:
                    assert sse.status_code == 200
                    assert sse.headers["content-type"].startswith("text/event-stream")
                    assert sse.headers["access-control-allow-origin"] == ALLOWED
                    async for line in sse.aiter_lines():
                        if line.startswith("id:"):
                            assert line == "id: 1"
                            break
    finally:
        svc.api.stop()


async def test_other_origins_get_no_allow_origin(cors_service: Service) -> None:
    svc = cors_service
    try:
        sid, token = await svc.create("echo")
        async with svc.client(credential=None) as c:
            evil = "https://evil.example.test"
            for origin in (evil, ALLOWED + "/", ALLOWED.replace("5173", "5174"), "null"):
                pre = await _preflight(c, f"/v1/sessions/{sid}/events", origin, "GET",
                                       "authorization")
                assert pre.status_code == 400
                assert pre.headers["content-type"] == "application/problem+json"
                assert pre.json()["type"] == "urn:eventcore:problem:cors-refused"
                assert "access-control-allow-origin" not in pre.headers
            got = await c.get(f"/v1/sessions/{sid}", headers={
                "Authorization": f"Bearer {token}", "Origin": evil})
            assert got.status_code == 200  # the server answers; the browser withholds it
            assert "access-control-allow-origin" not in got.headers
            # an allowed origin asking for a header the API does not read
            odd = await _preflight(c, f"/v1/sessions/{sid}/events", ALLOWED, "GET", "x-evil")
            assert odd.status_code == 400
    finally:
        svc.api.stop()


async def test_wildcard_and_default(service_env: dict[str, str], tmp_path: Path) -> None:
    star = Service({**service_env, "EVENTCORE_CORS_ORIGINS": "*"}, tmp_path)
    star.api.start()
    try:
        async with star.client(credential=None) as c:
            pre = await _preflight(c, "/v1/sessions", OTHER, "POST", "authorization,content-type")
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in pre.headers
            health = await c.get("/healthz", headers={"Origin": OTHER})
            assert health.headers["access-control-allow-origin"] == "*"
    finally:
        star.api.stop()
    plain = Service(service_env, tmp_path)  # no EVENTCORE_CORS_ORIGINS: no CORS at all
    plain.api.start()
    try:
        async with plain.client(credential=None) as c:
            pre = await _preflight(c, "/v1/sessions", OTHER, "POST", "authorization")
            assert pre.status_code == 405
            assert "access-control-allow-origin" not in pre.headers
            health = await c.get("/healthz", headers={"Origin": OTHER})
            assert "access-control-allow-origin" not in health.headers
    finally:
        plain.api.stop()


def test_origins_setting_is_parsed_and_validated() -> None:
    s = load_settings(cors_origins="https://A.example.test, http://localhost:3000,")
    assert s.cors_origins == ("https://a.example.test", "http://localhost:3000")
    assert load_settings().cors_origins == ()
    assert load_settings(cors_origins=" * ").cors_origins == ("*",)
    for bad in ("example.test", "https://a.example.test/", "https://a.example.test/app",
                "ftp://a.example.test", "*, https://a.example.test", "https://u@a.test",
                "https://a.test?x=1", "null"):
        with pytest.raises(ConfigError, match="EVENTCORE_CORS_ORIGINS"):
            load_settings(cors_origins=bad)
