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
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp  # exactly this inline code may run
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    # nothing is loaded from anywhere else, and nothing is built
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert "<script src" not in html and "import " not in html
    assert "new EventSource(" in html


async def test_the_requests_the_page_makes_work_as_it_makes_them(service: Service) -> None:
    """The page's flow: mint a read token with the user's credential (header), then open the
    stream with that token in the URL (an EventSource cannot set headers)."""
    sid, token = await service.create_session()
    await service.log.emit(sid, "message", {"text": "hello"})
    async with service.client(token) as c:
        r = await c.post(f"/v1/sessions/{sid}/tokens", json={"scope": "read", "ttl_s": 300})
        assert r.status_code == 200
        read = r.json()["token"]
    async with service.client() as c, httpx_sse.aconnect_sse(
        c, "GET", f"/v1/sessions/{sid}/events", params={"after": 0, "access_token": read}
    ) as source:
        assert source.response.status_code == 200
        events = []
        async for sse in source.aiter_sse():
            if sse.id:
                events.append((int(sse.id), sse.event))
            if len(events) == 2:
                break
    assert events == [(1, "session.created"), (2, "message")]


async def test_ui_answers_only_get(service: Service) -> None:
    async with service.client() as c:
        r = await c.post("/ui", content=b"x")
    assert r.status_code == 405
    assert r.headers["content-type"].startswith("application/problem+json")
