"""Malformed and hostile input: a 4xx problem, nothing written, never a 5xx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from service_support import API_KEY, Service

from eventcore import EventLog

PROBLEM = "application/problem+json"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def session(shared_service: Service) -> str:
    sid, _ = await shared_service.create("echo")
    return sid


def assert_4xx(r: httpx.Response, *statuses: int) -> None:
    assert 400 <= r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text)
    if statuses:
        assert r.status_code in statuses, (r.request.url, r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM, r.text
    body = r.json()
    assert body["type"].startswith("urn:eventcore:problem:") and body["status"] == r.status_code


async def test_malformed_bodies(shared_service: Service, shared_log: EventLog,
                                session: str) -> None:
    base = f"/v1/sessions/{session}"
    raw_bodies: list[tuple[str, bytes, int]] = [
        ("/inputs", b"{not json", 400),
        ("/inputs", b"\xff\xfe\x00garbage", 400),
        ("/inputs", b"", 422),
        ("/inputs", b"[1, 2, 3]", 422),
        ("/inputs", b'"just a string"', 422),
        ("/inputs", b'{"payload": 1, "idempotency_key": 5}', 422),
        ("/inputs", b'{"payload": 1, "idempotency_key": ""}', 422),
        ("/inputs", b'{"payload": 1, "extra": true}', 422),
        ("/inputs", b'{"idempotency_key": "k"}', 422),
        ("/inputs", b"[" * 5000 + b"]" * 5000, 400),  # nesting past the JSON parser's depth
        ("/signals", b'{"key": "", "value": 1}', 422),
        ("/signals", b'{"key": 7, "value": 1}', 422),
        ("/signals", ('{"key": "' + "k" * 600 + '", "value": 1}').encode(), 422),
        ("/signals", b'{"value": 1}', 422),
        ("/cancel", b'{"run_id": 12}', 422),
        ("/tokens", b'{"scope": "admin"}', 422),
        ("/tokens", b'{"ttl_s": -1}', 422),
    ]
    before = await shared_log.last_seq(session)
    async with shared_service.client() as c:
        for path, body, status in raw_bodies:
            r = await c.post(base + path, content=body,
                             headers={"Content-Type": "application/json"})
            assert_4xx(r, status)
        for body_json in ({"agent": ""}, {"agent": 5}, {}, {"agent": "echo", "ttl_s": -3},
                          {"agent": "echo", "metadata": {"a": 1}},
                          {"agent": "echo", "metadata": "x"}, {"agent": "no-such-agent"}):
            assert_4xx(await c.post("/v1/sessions", json=body_json), 422)
    assert await shared_log.last_seq(session) == before


async def _chunks(n: int, size: int) -> AsyncIterator[bytes]:
    yield b'{"payload": "'
    for _ in range(n):
        yield b"x" * size
    yield b'"}'


async def test_oversized_bodies_are_refused_while_streaming(
    shared_service: Service, shared_log: EventLog, session: str
) -> None:
    url = f"/v1/sessions/{session}/inputs"
    before = await shared_log.last_seq(session)
    async with shared_service.client() as c:
        # declared too large: refused from the header
        big: dict[str, Any] = {"payload": "x" * (80 * 1024)}
        assert_4xx(await c.post(url, json=big), 413)
        # chunked with no Content-Length: counted as it streams in
        assert_4xx(await c.post(url, content=_chunks(100, 1024)), 413)
        # a lying Content-Length (small) with a large body: httpx sends what it declares
        # only, so use a raw socket
    stream = await anyio.connect_tcp("127.0.0.1", shared_service.api.port or 0)
    async with stream:
        body = b'{"payload": "' + b"x" * (100 * 1024) + b'"}'
        await stream.send(
            f"POST {url} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        reply = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in reply:
                reply += await stream.receive()
    assert reply.startswith(b"HTTP/1.1 413")
    # just under the limit is fine
    async with shared_service.client() as c:
        ok = await c.post(url, json={"payload": "x" * (60 * 1024)})
        assert ok.status_code == 200
    assert await shared_log.last_seq(session) == before + 1


async def test_huge_headers_and_odd_ids(shared_service: Service, shared_log: EventLog,
                                        session: str) -> None:
    async with shared_service.client() as c:
        r = await c.get(f"/v1/sessions/{session}", headers={"X-Junk": "j" * (40 * 1024)})
        assert_4xx(r, 431)
        try:  # the server's own limit: a 400, or the connection closed mid-send
            r = await c.get(f"/v1/sessions/{session}", headers={"X-Junk": "j" * (400 * 1024)})
            assert 400 <= r.status_code < 500
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
            pass
        r = await c.get(f"/v1/sessions/{session}", headers={
            "Authorization": "Bearer " + "a" * 20_000})
        assert_4xx(r, 401)
        for odd in ("..", "-leading-dash", "a" * 129, "s%20pace", "%00", "%FF", "x%2Fy",
                    "%E2%98%83", "a;b", "a'b", "<script>", "a$b", "..%2F..%2Fetc"):
            for method, suffix, body in (("GET", "", None), ("GET", "/events", None),
                                         ("POST", "/inputs", {"payload": 1}),
                                         ("GET", "/signals", None), ("DELETE", "", None)):
                r = await c.request(method, f"/v1/sessions/{odd}{suffix}", json=body)
                assert_4xx(r, 404, 422)
        # query parameters
        events = f"/v1/sessions/{session}/events"
        for params in ({"after": "-1"}, {"after": "x"}, {"after": "1e9"}, {"limit": "0"},
                       {"limit": "100000"}, {"format": "xml"}, {"after": str(2**70)},
                       {"types": ",".join(f"t{i}" for i in range(100))}, {"types": "a\x01b"}):
            assert_4xx(await c.get(events, params={"format": "json", **params}), 400, 422)
        for bad in ("abc", "-1", "1.5", "9" * 40):
            assert_4xx(await c.get(events, headers={"Last-Event-ID": bad}), 400, 422)
        assert_4xx(await c.get(f"/v1/sessions/{session}/signals",
                               params={"since_seq": "-5"}), 422)
        assert_4xx(await c.get(f"/v1/sessions/{session}/signals",
                               params={"keys": "a," + "k" * 600}), 422)
        assert_4xx(await c.get("/v1/nope"), 404)
        assert_4xx(await c.put(f"/v1/sessions/{session}/inputs", json={}), 405)
    assert await shared_log.last_seq(session) == 1


async def test_strange_but_valid_json_is_stored_not_crashed(
    shared_service: Service, shared_log: EventLog, session: str
) -> None:
    async with shared_service.client() as c:
        for body in (b'{"payload": NaN}', b'{"payload": 1e400}', b'{"payload": "\\ud800"}',
                     b'{"payload": {"": {"\\u0000": [null, true, -0.0]}}}',
                     b'{"payload": ' + b"[" * 500 + b"]" * 500 + b"}"):
            r = await c.post(f"/v1/sessions/{session}/inputs", content=body,
                             headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (body[:40], r.text)
            if r.status_code >= 400:
                assert r.headers["content-type"] == PROBLEM
        # what was stored streams back out as valid JSON
        page = (await c.get(f"/v1/sessions/{session}/events",
                            params={"format": "json"})).json()
    assert page["events"][0]["type"] == "session.created"
    assert [e["seq"] for e in page["events"]] == list(
        range(1, await shared_log.last_seq(session) + 1))
