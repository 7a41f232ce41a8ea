"""Malformed and hostile input: a 4xx problem, nothing written, never a 5xx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from service_support import API_KEY, Service

from eventcore import Envelope, EventLog

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


# What a value may be, everywhere a client sends one (input payloads, signal values, a new
# session's input and metadata): JSON that every reader of it can take back, nested at most
# 64 deep, valid Unicode (no lone surrogates), finite numbers, integers within +-(2**53 - 1).
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


_BAD_VALUES = [
    '"\\ud800"',                   # a lone surrogate: not Unicode text
    '{"\\udc00": 1}',              # ... as an object key
    '["ok", "a\\ud83d"]',          # half of a surrogate pair
    "NaN", "Infinity", "-Infinity", "1e400",  # not JSON numbers (the parser takes them)
    str(2**53),                    # past what a JSON reader can hold exactly
    str(-(2**70)),
    _nested(65),                   # deeper than the limit
    _nested(400),                  # under the JSON parser's limit, over what reads can carry
    '{"a": ' * 100 + "1" + "}" * 100,
]


async def _post_json(c: httpx.AsyncClient, path: str, body: str) -> httpx.Response:
    return await c.post(path, content=body.encode(), headers={"Content-Type": "application/json"})


async def test_values_that_could_not_be_read_back_are_refused(
    shared_service: Service, shared_log: EventLog, session: str
) -> None:
    base = f"/v1/sessions/{session}"
    before = await shared_log.last_seq(session)
    async with shared_service.client() as c:
        for raw in _BAD_VALUES:
            for path, field in (("/inputs", '"payload"'), ("/signals", '"key": "k", "value"')):
                r = await _post_json(c, base + path, "{" + field + ": " + raw + "}")
                assert_4xx(r, 422)
                assert r.json()["errors"][0]["loc"][-1] in ("payload", "value"), r.text
            r = await _post_json(c, "/v1/sessions", '{"agent": "echo", "input": ' + raw + "}")
            assert_4xx(r, 422)
        for meta in ('{"\\ud800": "x"}', '{"k": "\\udfff"}'):
            r = await _post_json(c, "/v1/sessions", '{"agent": "echo", "metadata": ' + meta + "}")
            assert_4xx(r, 422)
        # the limits themselves are fine
        for raw in (_nested(64), str(2**53 - 1), str(-(2**53 - 1)), '"\\ud83d\\ude00"',
                    "1e308", '{"\\u0000": "\\u0000"}'):
            for path, field in (("/inputs", '"payload"'), ("/signals", '"key": "ok", "value"')):
                r = await _post_json(c, base + path, "{" + field + ": " + raw + "}")
                assert r.status_code == 200, (raw[:40], r.text)
    assert await shared_log.last_seq(session) == before + 12
    await _assert_reads_answer(shared_service, session)


async def _assert_reads_answer(svc: Service, sid: str) -> None:
    """Every read of the session answers 2xx, the projection included once it caught up."""
    async with svc.client() as c:
        r = await c.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200, r.text
        last = r.json()["last_seq"]
        with anyio.fail_after(20):
            while True:
                r = await c.get(f"/v1/sessions/{sid}")
                assert r.status_code == 200, r.text
                projection = r.json()["projection"]
                if projection is not None and projection["last_seq"] >= last:
                    break
                await anyio.sleep(0.05)  # the projector runs in the API process: poll it
        for path in ("/events?format=json&limit=1000", "/signals"):
            r = await c.get(f"/v1/sessions/{sid}{path}")
            assert r.status_code == 200, (path, r.text[:300])


async def test_a_deep_signal_value_cannot_break_reads_of_the_session(
    shared_service: Service, session: str
) -> None:
    # accepted by the JSON parser; before values were checked it was stored, and once projected
    # GET /v1/sessions/{id} answered 500 to everyone, the API key included
    async with shared_service.client() as c:
        r = await _post_json(c, f"/v1/sessions/{session}/signals",
                             '{"key": "deep", "value": ' + _nested(400) + "}")
        assert_4xx(r, 422)
    await _assert_reads_answer(shared_service, session)


_BAD_CURSORS = ["\u0661\u0662", "\u00b2", "+1", " 1", "1 ", "1_000", "-0", "1.0", "1e3",
                "0x10", "9" * 17, str(2**53 + 1), "", "\u00a01", "1\u200b", "\uff11"]


async def test_cursors_are_ascii_digits_only(shared_service: Service, session: str) -> None:
    base = f"/v1/sessions/{session}"
    async with shared_service.client() as c:
        for bad in _BAD_CURSORS:
            for path, name in (("/events", "after"), ("/events", "limit"),
                               ("/signals", "since_seq")):
                r = await c.get(base + path, params={"format": "json", name: bad})
                if bad == "" and name != "limit":
                    continue  # an empty optional cursor is no cursor
                assert_4xx(r, 400, 422)
            if bad == bad.strip(" \t") and bad:  # HTTP strips spaces around header values
                raw = bad.encode("latin-1") if bad.isascii() or max(map(ord, bad)) < 256 \
                    else bad.encode()  # so that the server decodes exactly `bad` if it can
                r = await c.get(base + "/events", params={"format": "json"},
                                headers={"Last-Event-ID": raw})
                assert_4xx(r, 400, 422)
        for good, expect in (("0", 1), ("007", 0), (str(2**53), 0)):
            r = await c.get(base + "/events", params={"format": "json", "after": good})
            assert r.status_code == 200 and len(r.json()["events"]) == expect, r.text
            r = await c.get(base + "/events", params={"format": "json"},
                            headers={"Last-Event-ID": good})
            assert r.status_code == 200 and len(r.json()["events"]) == expect, r.text


async def test_a_value_written_past_the_edge_cannot_break_reads(
    shared_service: Service, shared_log: EventLog, session: str
) -> None:
    # a trusted writer (a handler, a script on the log) that skipped the value rule: the read
    # model leaves the value out rather than hold what GET could not serialize
    deep: Any = []
    for _ in range(400):
        deep = [deep]
    await shared_log.append(Envelope(type="signal", session_id=session,
                                     payload={"key": "deep", "value": deep}))
    await _assert_reads_answer(shared_service, session)
    async with shared_service.client() as c:
        projection = (await c.get(f"/v1/sessions/{session}")).json()["projection"]
    assert "value" not in projection["signals"]["deep"] and projection["malformed"] == 1
