"""End to end against real processes: uvicorn serving the app, a worker hosting ``echo``,
real Redis. Clients: httpx-sse, and raw HTTP over a TCP socket."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from service_support import API_KEY, Service

from eventcore import EventLog


async def read_until(
    client: httpx.AsyncClient, url: str, stop: Any, *, headers: dict[str, str] | None = None,
) -> list[ServerSentEvent]:
    """Events from one SSE connection until ``stop(event)`` is true (or the server closes)."""
    got: list[ServerSentEvent] = []
    with anyio.fail_after(30):
        async with aconnect_sse(client, "GET", url, headers=dict(headers or {})) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            async for sse in source.aiter_sse():
                got.append(sse)
                if stop(sse):
                    break
    return got


def is_message(text: str) -> Any:
    return lambda e: e.event == "message" and json.loads(e.data)["payload"]["text"] == text


async def test_create_stream_inputs_resume_signals_cancel(
    service: Service, service_log: EventLog
) -> None:
    service.worker()
    sid, token = await service.create("echo", metadata={"team": "a"})
    url = f"/v1/sessions/{sid}/events"
    async with service.client(token) as c:
        # inputs: idempotency keys dedupe, each input is answered by the worker
        r1 = await c.post(f"/v1/sessions/{sid}/inputs",
                          json={"payload": {"text": "hello"}, "idempotency_key": "k1"})
        assert r1.status_code == 200, r1.text
        r2 = await c.post(f"/v1/sessions/{sid}/inputs",
                          json={"payload": {"text": "other"}, "idempotency_key": "k1"})
        assert r2.json() == {"seq": r1.json()["seq"], "duplicate": True}

        first = await read_until(c, url, is_message("hello"))
        seqs = [int(e.id) for e in first]
        assert seqs == list(range(1, len(seqs) + 1))
        types = [e.event for e in first]
        assert types[0] == "session.created"
        assert {"input", "run.started", "tool.started", "tool.ended", "signal",
                "message"} <= set(types)
        for e in first:  # data is the client envelope: seq inside, no server_data
            body = json.loads(e.data)
            assert body["seq"] == int(e.id) and body["type"] == e.event
            assert "server_data" not in body

        # resume mid-stream: disconnect at seq 3, append while away, resume with Last-Event-ID
        cut = 3
        await c.post(f"/v1/sessions/{sid}/inputs", json={"payload": {"text": "again"}})
        resumed = await read_until(c, url, is_message("again"),
                                   headers={"Last-Event-ID": str(cut)})
        rseqs = [int(e.id) for e in resumed]
        assert rseqs[0] == cut + 1
        assert rseqs == list(range(cut + 1, cut + 1 + len(rseqs)))  # nothing repeated/missing
        assert [e.data for e in resumed[: len(first) - cut]] == [e.data for e in first[cut:]]

        # ?after= resumes too; ?types= filters
        only = await read_until(c, f"{url}?after={cut}&types=message",
                                is_message("again"))
        assert [e.event for e in only] == ["message", "message"]

        # signals: replay since a seq, optionally by key
        s = await c.post(f"/v1/sessions/{sid}/signals", json={"key": "mood", "value": {"x": 1}})
        assert s.status_code == 200
        sig_seq = s.json()["seq"]
        everything = (await c.get(f"/v1/sessions/{sid}/signals")).json()["signals"]
        assert [e["payload"]["key"] for e in everything] == ["status", "status", "mood"]
        assert [e["seq"] for e in everything] == sorted(e["seq"] for e in everything)
        since = (await c.get(f"/v1/sessions/{sid}/signals",
                             params={"since_seq": sig_seq - 1, "keys": "mood,none"})).json()
        assert [(e["seq"], e["payload"]["value"]) for e in since["signals"]] == [
            (sig_seq, {"x": 1})]
        status_only = (await c.get(f"/v1/sessions/{sid}/signals",
                                   params={"keys": "status"})).json()["signals"]
        assert [e["payload"]["value"] for e in status_only] == ["replied", "replied"]

        # the projected state
        with anyio.fail_after(20):
            while True:
                view = (await c.get(f"/v1/sessions/{sid}")).json()
                if view["projection"] and view["projection"].get("last_seq", 0) >= sig_seq:
                    break
                await anyio.sleep(0.05)  # eventual consistency: poll the read model
        assert view["state"] in ("active", "idle") and view["labels"] == {"team": "a"}
        assert view["agent"] == "echo" and view["last_seq"] >= sig_seq

        # cancel: the worker ends the session; the open stream ends with session.ended
        async with anyio.create_task_group() as tg:
            ended: list[ServerSentEvent] = []

            async def follow() -> None:
                ended.extend(await read_until(c, f"{url}?after={sig_seq}",
                                              lambda e: e.event == "session.ended"))

            tg.start_soon(follow)
            cancel = await c.post(f"/v1/sessions/{sid}/cancel", json={})
            assert cancel.status_code == 202
        assert ended[-1].event == "session.ended"
        assert json.loads(ended[-1].data)["payload"]["reason"] == "cancelled"
        last = int(ended[-1].id)
        # an ended session the client has fully seen answers 204 (EventSource stops)
        done = await c.get(url, headers={"Last-Event-ID": str(last)})
        assert done.status_code == 204

        # JSON pages cover the same history
        pages: list[dict[str, Any]] = []
        after = 0
        while True:
            page = (await c.get(url, params={"format": "json", "after": after,
                                             "limit": 4})).json()
            if not page["events"]:
                assert page["next_after"] == after
                break
            pages += page["events"]
            after = page["next_after"]
        assert [e["seq"] for e in pages] == list(range(1, last + 1))

        # delete: 204, then the session is gone for every endpoint
        assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204
    async with service.client(API_KEY) as admin:
        gone = await admin.get(f"/v1/sessions/{sid}")
        assert gone.status_code == 404
        assert gone.headers["content-type"] == "application/problem+json"
        assert gone.json()["type"] == "urn:eventcore:problem:session-not-found"


async def raw_request(port: int, request: bytes) -> tuple[bytes, Any]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive()
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + rest, stream


async def test_raw_http_wire_format(service: Service, service_log: EventLog) -> None:
    sid, token = await service.create("echo")  # no worker: only what this test appends
    big = "x" * 10_000  # summarized: the full value stays in server_data, never on the wire
    async with service.client(token) as c:
        await c.post(f"/v1/sessions/{sid}/signals", json={"key": "blob", "value": big})
        await c.post(f"/v1/sessions/{sid}/inputs", json={"payload": [1, "two", None]})
    stored = await service_log.read(sid)
    assert stored[1].server_data == {"value": big}

    request = (f"GET /v1/sessions/{sid}/events?after=1 HTTP/1.1\r\nHost: t\r\n"
               f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n").encode()
    data, stream = await raw_request(service.api.port or 0, request)
    async with stream:
        head = data.split(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 200")
        assert "content-type: text/event-stream" in head
        assert "cache-control: no-store" in head
        with anyio.fail_after(10):
            while data.count(b"\nid: ") < 2 and b"id: 3" not in data:
                data += await stream.receive()
            while b"id: 3\n" not in data or not data.rstrip(b"\r\n").endswith(b"}"):
                data += await stream.receive()
    frames = [f for f in _dechunk(data).split("\n\n") if f.startswith("id:")]
    parsed = [dict(line.split(": ", 1) for line in f.splitlines()) for f in frames]
    assert [(p["id"], p["event"]) for p in parsed[:2]] == [("2", "signal"), ("3", "input")]
    signal_env = json.loads(parsed[0]["data"])
    assert signal_env["payload"]["summary"]["size"] == len(json.dumps(big))
    assert "server_data" not in signal_env and big not in parsed[0]["data"]
    assert json.loads(parsed[1]["data"])["payload"] == [1, "two", None]


def _dechunk(data: bytes) -> str:
    """The body of a chunked HTTP/1.1 response (as far as it arrived)."""
    body = data.split(b"\r\n\r\n", 1)[1]
    out = b""
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        out += rest[:size]
        body = rest[size + 2:]
    return out.decode()
