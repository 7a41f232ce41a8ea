"""``GET /ui`` over real HTTP: a self-contained page with a strict Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx_sse
from live_service import Service


async def test_ui_is_a_self_contained_page_with_a_strict_csp(service: Service) -> None:
    async with service.client() as c:  # no credentials: the page itself is public
        r = await c.get("/ui")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    html = r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert "script-src 'self' 'sha256-" in csp  # the SDK from this origin, the page by hash
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", html, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp  # exactly this inline code may run
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    # nothing is loaded from anywhere else, and nothing is built: one module, the SDK
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert "<script src" not in html
    assert re.findall(r"^import .*$", html, flags=re.M) == [
        'import { EventcoreClient } from "./ui/eventcore.js";']
    assert "new EventSource(" not in html and "access_token" not in html


async def test_the_requests_the_page_makes_work_as_it_makes_them(service: Service) -> None:
    """The SDK's stream request: the credential in the Authorization header (never in the
    URL) and the cursor in Last-Event-ID."""
    sid, token = await service.create_session()
    await service.log.emit(sid, "message", {"text": "hello"})
    await service.log.emit(sid, "message", {"text": "again"})
    async with service.client(token) as c, httpx_sse.aconnect_sse(
        c, "GET", f"/v1/sessions/{sid}/events", params={"after": 1},
        headers={"Last-Event-ID": "1", "Accept": "text/event-stream"},
    ) as source:
        assert source.response.status_code == 200
        events = []
        async for sse in source.aiter_sse():
            if sse.id:
                events.append((int(sse.id), sse.event))
            if len(events) == 2:
                break
    assert events == [(2, "message"), (3, "message")]


async def test_ui_answers_only_get(service: Service) -> None:
    async with service.client() as c:
        r = await c.post("/ui", content=b"x")
    assert r.status_code == 405
    assert r.headers["content-type"].startswith("application/problem+json")
