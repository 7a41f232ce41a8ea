"""The auth matrix: no credentials, garbage, another session's token, an expired token, a
read-only token, tokens in URLs, the API key — on every session endpoint. Rejections write
nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from service_support import API_KEY, Service

from eventcore import EventLog
from eventcore.server._http import Auth

PROBLEM = "application/problem+json"


def endpoints(sid: str) -> list[tuple[str, str, dict[str, Any] | None, bool]]:
    """(method, path, json body, writes?) for every session endpoint."""
    base = f"/v1/sessions/{sid}"
    return [
        ("GET", base, None, False),
        ("GET", f"{base}/events?format=json", None, False),
        ("GET", f"{base}/signals?since_seq=0", None, False),
        ("POST", f"{base}/tokens", {"scope": "read"}, False),
        ("POST", f"{base}/inputs", {"payload": {"text": "x"}}, True),
        ("POST", f"{base}/signals", {"key": "k", "value": 1}, True),
        ("POST", f"{base}/cancel", {}, True),
        ("DELETE", base, None, True),
    ]


async def call(c: httpx.AsyncClient, method: str, path: str, body: Any,
               headers: dict[str, str] | None = None) -> httpx.Response:
    return await c.request(method, path, json=body, headers=headers)


def assert_problem(r: httpx.Response, status: int, slug: str) -> None:
    assert r.status_code == status, (r.request.method, r.request.url.path, r.text)
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["type"] == f"urn:eventcore:problem:{slug}"
    assert r.json()["status"] == status


@pytest.fixture
async def two(shared_service: Service) -> tuple[str, str, str, str]:
    a, ta = await shared_service.create("echo")
    b, tb = await shared_service.create("echo")
    return a, ta, b, tb


async def test_rejections_write_nothing(
    shared_service: Service, shared_log: EventLog, two: tuple[str, str, str, str]
) -> None:
    a, ta, b, tb = two
    other_key = Auth("another-api-key-" + "y" * 20)
    inc = (await shared_log.get_session(a)).incarnation
    expired = Auth(API_KEY).mint(a, incarnation=inc, ttl_s=-5)
    forged = other_key.mint(a, incarnation=inc)
    read_only = Auth(API_KEY).mint(a, incarnation=inc, scope="read", ttl_s=60)
    before = (await shared_log.last_seq(a), await shared_log.last_seq(b))
    async with httpx.AsyncClient(base_url=shared_service.url, timeout=10) as c:
        for method, path, body, writes in endpoints(a):
            # no credentials at all
            r = await call(c, method, path, body)
            assert_problem(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
            # malformed header, garbage, a token signed with another key
            for header in ("Basic abc", "Bearer", "Bearer not-a-token", f"Bearer {forged}",
                           "Bearer " + "z" * 5000):
                assert_problem(await call(c, method, path, body, {"Authorization": header}),
                               401, "unauthorized")
            # the right session but expired
            assert_problem(await call(c, method, path, body,
                                      {"Authorization": f"Bearer {expired}"}),
                           401, "token-expired")
            # another session's (valid) token
            assert_problem(await call(c, method, path, body,
                                      {"Authorization": f"Bearer {tb}"}), 403, "forbidden")
            if writes:  # a read-only token cannot write
                assert_problem(await call(c, method, path, body,
                                          {"Authorization": f"Bearer {read_only}"}),
                               403, "forbidden")
        # creating sessions needs the API key
        assert_problem(await c.post("/v1/sessions", json={"agent": "echo"},
                                    headers={"Authorization": f"Bearer {ta}"}),
                       403, "forbidden")
        assert_problem(await c.post("/v1/sessions", json={"agent": "echo"}), 401,
                       "unauthorized")
        # tokens in URLs: only read-scoped session tokens, only on GET
        events = f"/v1/sessions/{a}/events?format=json"
        assert_problem(await c.get(f"{events}&access_token={API_KEY}"), 401, "unauthorized")
        assert_problem(await c.get(f"{events}&access_token={ta}"), 401, "unauthorized")
        assert_problem(await c.post(f"/v1/sessions/{a}/inputs?access_token={read_only}",
                                    json={"payload": 1}), 401, "unauthorized")
        assert (await c.get(f"{events}&access_token={read_only}")).status_code == 200
        assert_problem(await c.get(f"/v1/sessions/{b}/events?format=json&"
                                   f"access_token={read_only}"), 403, "forbidden")
        # a read-only token cannot mint a read-write one
        assert_problem(await c.post(f"/v1/sessions/{a}/tokens", json={"scope": "rw"},
                                    headers={"Authorization": f"Bearer {read_only}"}),
                       403, "forbidden")
    assert (await shared_log.last_seq(a), await shared_log.last_seq(b)) == before


async def test_the_right_credentials_work(
    shared_service: Service, shared_log: EventLog, two: tuple[str, str, str, str]
) -> None:
    a, ta, b, _ = two
    async with httpx.AsyncClient(base_url=shared_service.url, timeout=10) as c:
        for credential in (ta, API_KEY):
            for method, path, body, _writes in endpoints(a)[:-2]:  # keep a alive
                r = await call(c, method, path, body, {"Authorization": f"Bearer {credential}"})
                assert r.status_code in (200, 202), (method, path, r.text)
        minted = await c.post(f"/v1/sessions/{a}/tokens", json={"scope": "read", "ttl_s": 30},
                              headers={"Authorization": f"Bearer {ta}"})
        assert minted.json()["expires_in"] <= 30
        r = await c.get(f"/v1/sessions/{a}/signals", params={
            "access_token": minted.json()["token"]})
        assert [s["payload"]["key"] for s in r.json()["signals"]] == ["k", "k"]
        # the API key reaches any session; unknown sessions are 404 for it
        assert (await c.get(f"/v1/sessions/{b}", headers={
            "Authorization": f"Bearer {API_KEY}"})).status_code == 200
        assert_problem(await c.get("/v1/sessions/no-such-session", headers={
            "Authorization": f"Bearer {API_KEY}"}), 404, "session-not-found")
        # a session's own token on its deleted session: 404, not 403
        assert (await c.delete(f"/v1/sessions/{a}", headers={
            "Authorization": f"Bearer {ta}"})).status_code == 204
        assert_problem(await c.get(f"/v1/sessions/{a}", headers={
            "Authorization": f"Bearer {ta}"}), 404, "session-not-found")
    assert await shared_log.last_seq(b) == 1
