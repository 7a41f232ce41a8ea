"""A hostile fuzz of every operation the served OpenAPI schema declares: every path, query and
header parameter (``access_token`` and ``Authorization`` included) and every body property gets
hostile values as well as valid ones (Unicode digits and signs in cursors, lone surrogates, NaN,
huge integers, nesting past any limit, percent-encoded parameter names...). Asserted: no 5xx,
ever; and after any accepted write the session still reads back (state, events, signals),
its projection included once the projector has caught up.

The operations and their parameters come from the schema, so a new parameter is fuzzed too."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_support import API_KEY, Service

# -- hostile pieces --------------------------------------------------------------------------
NUMBERS_TEXT = ["\u0661\u0662", "\u00b2", "+1", " 1", "1 ", "1_000", "-0", "-1", "1.0", "1e3",
                "0x10", "9" * 17, "9" * 400, str(2**53), str(2**53 + 1), "", "\u00a01", "1\u200b",
                "\uff11", "NaN", "Infinity", "0", "1", "007"]
TEXT = [*NUMBERS_TEXT, "..", "%00", "%2F", "a,b,,c", ",", "a" * 600, "k" * 9000, "\x7f", "é",
        "\u202e", "session.created", "json", "sse", "xml", "read", "rw"]
hostile_text = st.one_of(st.sampled_from(TEXT), st.text(max_size=24),
                         st.integers().map(str),
                         st.binary(max_size=12).map(lambda b: b.decode("latin-1")))

JSON_LEAVES = ["null", "true", "false", "0", "-0", "1.5", "1e308", "1e400", "-1e400", "NaN",
               "Infinity", "-Infinity", str(2**53 - 1), str(2**53), str(2**64), str(-(2**70)),
               '"\\ud800"', '"\\udfff"', '"a\\ud83d"', '"\\ud83d\\ude00"', '"\\u0000"',
               '"\u2028"', '""']
json_keys = st.one_of(st.text(max_size=8).map(json.dumps),
                      st.sampled_from(['"\\ud800"', '"\\u0000"', '""', '"key"']))
json_leaf = st.one_of(st.sampled_from(JSON_LEAVES), st.text(max_size=12).map(json.dumps),
                      st.integers().map(str))


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


json_tree = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4).map(_array)
    | st.lists(st.tuples(json_keys, inner), max_size=4).map(_object),
    max_leaves=12,
)
deep = st.tuples(st.integers(55, 1500), st.booleans()).map(
    lambda t: "[" * t[0] + "]" * t[0] if t[1] else '{"a":' * t[0] + "1" + "}" * t[0])
hostile_json = st.one_of(json_tree, json_tree, deep)

VALID: dict[str, str] = {"agent": '"echo"', "key": '"k"', "scope": '"read"', "ttl_s": "60",
                         "idempotency_key": '"fuzz"', "run_id": '"r1"', "reason": '"why"',
                         "payload": '{"text": "hi"}', "value": "1", "input": "null",
                         "metadata": '{"a": "b"}'}


# -- requests from the schema ----------------------------------------------------------------
class Op:
    def __init__(self, method: str, path: str, op: dict[str, Any], schema: dict[str, Any]):
        self.method = method.upper()
        self.path = path
        self.params = [(p["in"], p["name"]) for p in op.get("parameters", [])]
        if self.method == "GET" and path.startswith("/v1/"):
            self.params.append(("query", "access_token"))
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
        self.fields = list(_resolve(body.get("schema"), schema).get("properties", {}))
        self.has_body = "schema" in body

    def __repr__(self) -> str:
        return f"{self.method} {self.path}"


def _resolve(node: Any, schema: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(node, dict):
        return {}
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _resolve(schema["components"]["schemas"][name], schema)
    for alt in node.get("anyOf", ()):
        found = _resolve(alt, schema)
        if found.get("properties"):
            return found
    return node


def _header_value(text: str) -> bytes | None:
    """``text`` as the server will decode it (Latin-1, where it can be: so ``²`` arrives as
    ``²``), and only what an HTTP client can send at all: no control characters, no
    surrounding spaces."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    raw = bytes(b for b in raw if (b >= 0x20 and b != 0x7F) or b == 0x09).strip(b" \t")
    return raw or None


@dataclass
class Request:
    op: Op
    sid: str  # a real session's id, or hostile text
    query: str
    headers: dict[str, bytes]
    body: bytes | None

    def url(self, sid: str | None = None) -> str:
        path = self.op.path.replace("{session_id}", quote(sid or self.sid, safe="") or "x")
        return path + ("?" + self.query if self.query else "")


VALID_PARAMS: dict[str, list[str]] = {
    "after": ["0", "1"], "limit": ["100", "1"], "format": ["json", "sse"],
    "types": ["signal,input", "session.created"], "since_seq": ["0", "2"], "keys": ["k", "a,b"],
    "last-event-id": ["1", "0"],
}
REQUIRED = ("agent", "key", "payload")
DEEP = ["[" * n + "]" * n for n in (65, 300, 1200)] + ['{"a":' * 300 + "1" + "}" * 300]
hostile_value = st.one_of(st.sampled_from(JSON_LEAVES), st.sampled_from(DEEP), hostile_json)


def slots(op: Op) -> list[str]:
    """Everything a request to ``op`` can carry: its parameters, body fields, the credential
    and (with a body) the body as a whole."""
    out = [f"{w}:{n}" for w, n in op.params] + [f"body:{f}" for f in op.fields] + ["auth"]
    return [*out, "body"] if op.has_body else out


def build(op: Op, sid: str, values: dict[str, str | None], *, spell: int = 0,
          repeat: bool = False) -> Request:
    """A request to ``op``: ``values`` by slot (text; JSON text for body fields), ``None`` or
    missing leaves it out (body fields a call needs and the API key excepted)."""
    sid = values.get("path:session_id") or sid
    query: list[str] = []
    headers: dict[str, bytes] = {}
    for where, name in op.params:
        value = values.get(f"{where}:{name}")
        if where == "path" or value is None:
            continue
        if where == "header":
            header = _header_value(value)
            if header is not None:
                headers[name] = header
            continue
        spelled = [name, quote(name, safe=""), name.upper(),
                   "".join(f"%{ord(c):02X}" for c in name)][spell % 4]
        query.append(f"{spelled}={quote(value, safe='')}")
        if repeat:
            query.append(query[-1])
    auth = values.get("auth", API_KEY)
    if auth:
        headers["Authorization"] = f"Bearer {auth}".encode()
    body: bytes | None = None
    if op.has_body:
        whole = values.get("body")
        if whole is None:
            pairs = [(json.dumps(f), values.get(f"body:{f}") or VALID.get(f, "null"))
                     for f in op.fields if f"body:{f}" in values or f in REQUIRED]
            whole = _object(pairs)
        body = whole.encode("utf-8", "surrogatepass")
        headers["Content-Type"] = b"application/json"
    return Request(op, sid, "&".join(query), headers, body)


@st.composite
def requests(draw: st.DrawFn, op: Op, sessions: list[str], tokens: list[str]) -> Request:
    """Mostly one hostile thing at a time (so the rest of the request is valid and the hostile
    value reaches as far in as it can), sometimes everything at once."""
    chaos = draw(st.integers(0, 4)) == 0
    hot = draw(st.sampled_from(slots(op)))
    values: dict[str, str | None] = {}
    for slot in slots(op):
        hostile = slot == hot or (chaos and draw(st.booleans()))
        where, _, name = slot.partition(":")
        if slot == "auth":
            if hostile:
                values[slot] = draw(st.sampled_from([*tokens, "garbage", "", "x" * 5000]))
        elif slot == "body":
            if hostile:
                values[slot] = draw(st.one_of(st.binary(max_size=40).map(
                    lambda b: b.decode("latin-1")), hostile_json))
        elif where == "body":
            if hostile:
                values[slot] = draw(hostile_value)
            elif draw(st.booleans()):
                values[slot] = VALID.get(name, "null")
        elif hostile:
            values[slot] = draw(hostile_text)
        elif where != "path" and name != "access_token" and draw(st.booleans()):
            values[slot] = draw(st.sampled_from(VALID_PARAMS.get(name, ["1"])))
    return build(op, draw(st.sampled_from(sessions)), values,
                 spell=draw(st.integers(0, 3)), repeat=draw(st.integers(0, 5)) == 0)


def sweep(op: Op, sid: str, tokens: list[str]) -> list[Request]:
    """Every slot of ``op`` with every curated hostile value, the rest of the request valid."""
    out = []
    for slot in slots(op):
        where = slot.partition(":")[0]
        if slot == "auth":
            choices = [*tokens, "garbage", "x" * 5000]
        elif where == "body":
            choices = JSON_LEAVES + DEEP
        else:
            choices = TEXT
        for i, value in enumerate(choices):
            out.append(build(op, sid, {slot: value}, spell=i, repeat=i % 7 == 0))
    return out


# -- the run ---------------------------------------------------------------------------------
class Fuzz:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.client = httpx.Client(base_url=svc.url, timeout=15,
                                   headers={"Authorization": f"Bearer {API_KEY}"})
        schema = self.client.get("/openapi.json").json()
        self.ops = [Op(m, p, o, schema) for p, ops in schema["paths"].items()
                    for m, o in ops.items()]
        assert {o.path for o in self.ops} >= {"/v1/sessions", "/v1/sessions/{session_id}/events"}
        self.sessions = [self.create() for _ in range(3)]
        self.tokens = [self.client.post(f"/v1/sessions/{self.sessions[0]}/tokens",
                                        json={"scope": "read"}).json()["token"]]
        self.written: set[str] = set()
        self.statuses: dict[int, int] = {}

    def create(self) -> str:
        r = self.client.post("/v1/sessions", json={"agent": "echo", "input": {"text": "hi"}})
        assert r.status_code == 201, r.text
        sid: str = r.json()["session_id"]
        return sid

    def send(self, method: str, url: str, headers: dict[str, bytes], body: bytes | None
             ) -> tuple[int, bytes]:
        for _ in (1, 2):
            # streamed: an SSE answer is judged by its status; its body would not end
            try:
                with self.client.stream(method, url, headers=headers, content=body) as r:
                    data = b"" if r.headers.get("content-type", "").startswith(
                        "text/event-stream") else r.read()
                    status = r.status_code
                break
            except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                # dropped: how an unhandled error ends an answer (once more on a new
                # connection, in case it was an idle pooled one the server had closed)
                status, data = 599, repr(exc).encode()
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return status, data

    def example(self, req: Request) -> None:
        method = req.op.method
        sid: str | None = req.sid if req.sid in self.sessions else None
        if method == "DELETE" and sid is not None:  # keep the shared sessions: delete a twin
            sid = self.create()
        url = req.url(sid)
        status, data = self.send(method, url, req.headers, req.body)
        if status == 400 and data == b"Invalid HTTP request received.":
            return  # refused by the HTTP server's own parser
        assert status < 500, (req.op, url[:300], (req.body or b"")[:300], status, data[:500])
        if method == "POST" and 200 <= status < 300:
            if req.op.path == "/v1/sessions":
                sid = json.loads(data)["session_id"]
            if sid is not None:
                self.written.add(sid)
                self.check_reads(sid)
        if method == "DELETE" and sid is not None:
            assert self.client.get(f"/v1/sessions/{sid}").status_code in (200, 404)

    def check_reads(self, sid: str) -> None:
        base = f"/v1/sessions/{sid}"
        for path in ("", "/events?format=json&limit=1000", "/signals"):
            r = self.client.get(base + path)
            assert r.status_code == 200, (path, r.status_code, r.text[:500])

    async def caught_up(self) -> None:
        """Every session written to reads back with its projection up to date."""
        async with httpx.AsyncClient(base_url=self.svc.url, timeout=15, headers={
                "Authorization": f"Bearer {API_KEY}"}) as c:
            for sid in sorted(self.written):
                with anyio.fail_after(30):
                    while True:
                        r = await c.get(f"/v1/sessions/{sid}")
                        assert r.status_code == 200, r.text[:500]
                        p = r.json()["projection"]
                        if p is not None and p["last_seq"] >= r.json()["last_seq"]:
                            break
                        await anyio.sleep(0.05)  # the projector is in the API process
                self.check_reads(sid)


def _fuzz(svc: Service, examples: int) -> None:
    fuzz = Fuzz(svc)
    try:
        _run(fuzz, examples)
        anyio.run(fuzz.caught_up)
    finally:
        fuzz.client.close()
    assert sum(fuzz.statuses.values()) >= examples * 0.9
    assert not any(code >= 500 for code in fuzz.statuses)
    # the run got through the edge as well as refused by it
    assert any(200 <= c < 300 for c in fuzz.statuses)
    assert any(c in (400, 422) for c in fuzz.statuses)
    assert fuzz.written


def _run(fuzz: Fuzz, examples: int) -> None:
    for op in fuzz.ops:  # each operation gets its share

        @given(req=requests(op, fuzz.sessions, fuzz.tokens))
        @settings(max_examples=max(1, examples // len(fuzz.ops)), deadline=None,
                  database=None, suppress_health_check=list(HealthCheck))
        def run(req: Request) -> None:
            fuzz.example(req)

        run()


def test_every_parameter_gets_every_hostile_value(shared_service: Service) -> None:
    fuzz = Fuzz(shared_service)
    failures: list[str] = []  # all of them, not only the first
    try:
        for op in fuzz.ops:
            for req in sweep(op, fuzz.sessions[1], fuzz.tokens):
                try:
                    fuzz.example(req)
                except AssertionError as exc:
                    failures.append(str(exc)[:400])
        try:
            anyio.run(fuzz.caught_up)
        except AssertionError as exc:
            failures.append(f"read back: {str(exc)[:400]}")
    finally:
        fuzz.client.close()
    assert not failures, "\n".join(failures[:12])
    assert not any(code >= 500 for code in fuzz.statuses)
    assert fuzz.written and fuzz.statuses.get(422, 0) > 100


def test_hostile_fuzz_finds_no_server_error(shared_service: Service) -> None:
    _fuzz(shared_service, 600)


@pytest.mark.slow
@pytest.mark.timeout(900)  # thousands of examples: minutes on a busy 2-core machine
def test_hostile_fuzz_long(shared_service: Service) -> None:
    _fuzz(shared_service, 4000)

