"""GET /v1/sessions/{id}/ws against a real API process, with a real WebSocket client."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import anyio
import httpx
import pytest
from divergence import lose_tail
from service_support import API_KEY, Service
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from ws_client import SUBPROTOCOL, Reader, close_code, open_ws, ws_url

from eventcore import Envelope, EventLog


async def _append(log: EventLog, sid: str, n: int, tag: str = "x") -> list[int]:
    seqs = []
    for i in range(n):
        res = await log.append(Envelope(type="input", session_id=sid,
                                        payload={"text": f"{tag}{i}"}))
        seqs.append(res.seq)
    return seqs


async def _last_seq(log: EventLog, sid: str) -> int:
    return (await log.get_session(sid)).last_seq


@pytest.mark.parametrize("via", ["subprotocol", "header", "hello"])
async def test_stream_inputs_and_acks(service: Service, service_log: EventLog, via: str) -> None:
    sid, token = await service.create()
    ws = await open_ws(service.url, sid, token, via=via)
    # no permessage-deflate: a session's frames would be compressed once per client
    assert ws.response is not None
    assert "Sec-WebSocket-Extensions" not in ws.response.headers
    r = Reader(ws)
    await r.until_seq(1)
    assert r.envelopes[0]["type"] == "session.created"
    assert "server_data" not in r.envelopes[0]
    await ws.send(json.dumps({"type": "input", "payload": {"text": "hi"},
                              "idempotency_key": "k1", "id": 7}))
    ack = await r.reply()
    assert ack == {"type": "ack", "id": 7, "seq": ack["seq"], "duplicate": False}
    await ws.send(json.dumps({"type": "input", "payload": {"text": "hi"},
                              "idempotency_key": "k1", "id": "again"}))
    again = await r.reply()
    assert again["duplicate"] is True and again["seq"] == ack["seq"]
    # the HTTP route dedupes against the socket: the same key, the same seq
    async with service.client(token) as c:
        resp = await c.post(f"/v1/sessions/{sid}/inputs",
                            json={"payload": {"text": "hi"}, "idempotency_key": "k1"})
    assert resp.json() == {"seq": ack["seq"], "duplicate": True}
    await ws.send(json.dumps({"type": "signal", "key": "mood", "value": "ok", "id": 8}))
    sig = await r.reply()
    assert sig["type"] == "ack" and sig["seq"] == ack["seq"] + 1
    await r.until_seq(sig["seq"])
    assert r.seqs == list(range(1, sig["seq"] + 1))
    inputs = [e for e in r.envelopes if e["type"] == "input"]
    assert [e["payload"] for e in inputs] == [{"text": "hi"}]
    assert await _last_seq(service_log, sid) == sig["seq"]
    await ws.close()


async def test_resume_after_disconnect_no_gap_no_duplicate(
    service: Service, service_log: EventLog
) -> None:
    sid, token = await service.create()
    await _append(service_log, sid, 30, "a")
    ws = await open_ws(service.url, sid, token)
    r = Reader(ws)
    await r.until_seq(10)
    last = r.seqs[-1]
    await ws.close()
    await _append(service_log, sid, 20, "b")  # while disconnected
    ws2 = await open_ws(service.url, sid, token, after=last)
    r2 = Reader(ws2)
    total = await _last_seq(service_log, sid)
    await r2.until_seq(total)
    assert r.seqs[: r.seqs.index(last) + 1] + r2.seqs == list(range(1, total + 1))
    # live after catch-up
    more = await _append(service_log, sid, 5, "c")
    await r2.until_seq(more[-1])
    assert r2.seqs == list(range(last + 1, more[-1] + 1))
    await ws2.close()


@pytest.mark.own_api
async def test_api_restart_mid_stream(service: Service, service_log: EventLog) -> None:
    sid, token = await service.create()
    await _append(service_log, sid, 10)
    ws = await open_ws(service.url, sid, token)
    r = Reader(ws)
    await r.until_seq(11)
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, service.api.stop)
        code, _, seen = await close_code(ws, limit_s=30)
    assert code == 1012  # service restart: resume on any server
    for m in seen:
        if m["type"] == "events":
            r.envelopes += m["events"]
    await _append(service_log, sid, 10, "down")  # while the API is away
    await anyio.to_thread.run_sync(service.api.start)
    last = r.seqs[-1]
    ws2 = await open_ws(service.url, sid, token, after=last)
    r2 = Reader(ws2)
    total = await _last_seq(service_log, sid)
    await r2.until_seq(total)
    assert r.seqs + r2.seqs == list(range(1, total + 1))
    await ws2.close()


async def test_session_end_closes_1000(service: Service, service_log: EventLog) -> None:
    sid, token = await service.create()
    ws = await open_ws(service.url, sid, token)
    await service_log.end_session(sid)
    code, _, seen = await close_code(ws)
    assert code == 1000
    assert seen[-1]["type"] == "end"
    events = [e for m in seen if m["type"] == "events" for e in m["events"]]
    assert events[-1]["type"] == "session.ended"
    assert seen[-1]["last_seq"] == events[-1]["seq"]


async def test_session_deleted_closes_4404(service: Service) -> None:
    sid, token = await service.create()
    ws = await open_ws(service.url, sid, token)
    async with service.client() as c:
        assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204
    code, _, seen = await close_code(ws)
    # the delete ends the session first: the stream may reach its session.ended before the
    # keys go, or see its incarnation gone first
    assert (code, seen[-1]["type"]) in ((1000, "end"), (4404, "session_deleted"))
    assert (await _refused(service.url, sid, hello={"token": API_KEY}))[0] == 4404


HOSTILE: list[tuple[str, Any, int]] = [
    ("binary", b'{"type": "input", "payload": 1}', 1003),
    ("ten-megabytes", json.dumps({"type": "input", "payload": "x" * (10 * 1024 * 1024)}), 1009),
    ("invalid-json", '{"type": "input", "payload": ', 1007),
    ("not-an-object", "[1, 2, 3]", 1007),
    ("wrong-fields", json.dumps({"type": "input", "payload": 1, "extra": True}), 1007),
    ("unknown-type", json.dumps({"type": "launch", "payload": 1}), 1008),
    ("second-hello", json.dumps({"type": "hello", "after": 0}), 1008),
]


@pytest.mark.parametrize(("frame", "code"), [(f, c) for _, f, c in HOSTILE],
                         ids=[n for n, _, _ in HOSTILE])
async def test_hostile_frames_close_and_write_nothing(
    service: Service, service_log: EventLog, frame: Any, code: int
) -> None:
    sid, token = await service.create()
    before = await _last_seq(service_log, sid)
    ws = await open_ws(service.url, sid, token)
    await ws.send(frame)
    got, reason, _ = await close_code(ws)
    assert got == code, reason
    assert reason
    assert await _last_seq(service_log, sid) == before


async def test_hostile_first_frames(service: Service, service_log: EventLog) -> None:
    sid, token = await service.create()
    before = await _last_seq(service_log, sid)
    for frame, code in [(b"\x00\x01", 1003), ("nope", 1007),
                        (json.dumps({"type": "input", "payload": 1}), 1008)]:
        async with connect(ws_url(service.url, sid),
                           subprotocols=[SUBPROTOCOL, f"eventcore.token.{token}"]) as ws:  # type: ignore[list-item]
            await ws.send(frame)
            got, _, seen = await close_code(ws)
            assert (got, seen) == (code, [])
    assert await _last_seq(service_log, sid) == before


async def _refused(url: str, sid: str, *, protos: list[str] | None = None,
                   hello: dict[str, Any] | None = None) -> tuple[int, str]:
    async with connect(ws_url(url, sid), subprotocols=protos or [SUBPROTOCOL]) as ws:  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionClosed):  # a bad id is refused before the hello
            await ws.send(json.dumps({"type": "hello", "after": 0, **(hello or {})}))
        code, reason, seen = await close_code(ws)
        assert seen == []  # nothing streamed before the refusal
        return code, reason


async def test_auth_failures(service: Service, service_log: EventLog) -> None:
    sid, token = await service.create()
    other, other_token = await service.create()
    assert (await _refused(service.url, sid))[0] == 4401
    assert (await _refused(service.url, sid, hello={"token": "not-a-token"}))[0] == 4401
    assert (await _refused(service.url, sid, protos=[SUBPROTOCOL, "eventcore.token.bad"]))[0] \
        == 4401
    assert (await _refused(service.url, sid, hello={"token": other_token}))[0] == 4403
    # the API key in the URL is not a credential here (nor anywhere)
    async with connect(ws_url(service.url, sid) + f"?access_token={API_KEY}") as ws:
        await ws.send(json.dumps({"type": "hello"}))
        assert (await close_code(ws))[0] == 4401
    assert (await _refused(service.url, "no-such-session", hello={"token": API_KEY}))[0] == 4404
    assert (await _refused(service.url, "bad%20id", hello={"token": API_KEY}))[0] == 4400
    # a read-only token streams but may not write
    async with service.client(token) as c:
        ro = (await c.post(f"/v1/sessions/{sid}/tokens", json={"scope": "read"})).json()["token"]
    before = await _last_seq(service_log, sid)
    ws = await open_ws(service.url, sid, ro)
    r = Reader(ws)
    await ws.send(json.dumps({"type": "input", "payload": 1, "id": 1}))
    err = await r.reply()
    assert (err["type"], err["status"], err["error"]) == ("error", 403, "read_only")
    assert await _last_seq(service_log, sid) == before
    await ws.close()
    # a token whose session was deleted and created again opens nothing
    async with service.client() as c:
        await c.delete(f"/v1/sessions/{other}")
    assert (await _refused(service.url, other, hello={"token": other_token}))[0] in (4401, 4404)


async def test_token_expiry_closes_4401(service: Service) -> None:
    sid, token = await service.create()
    async with httpx.AsyncClient(base_url=service.url,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        for _ in range(5):
            # exp is in whole seconds: a 1 s token lives 0-1 s, and a loaded machine may take
            # longer than that to get to `ready` (refused then, 4401 too): mint another
            short = (await c.post(f"/v1/sessions/{sid}/tokens",
                                  json={"scope": "read", "ttl_s": 1})).json()["token"]
            try:
                ws = await open_ws(service.url, sid, short)
                break
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 4401, exc
        else:
            raise AssertionError("every 1 s token expired before the connection was ready")
    code, _, seen = await close_code(ws)
    assert code == 4401
    # resume after what was delivered: session.created, unless the token expired first (a
    # loaded machine took longer than its one second to get there)
    delivered = [e["seq"] for m in seen if m.get("type") == "events" for e in m["events"]]
    assert delivered == list(range(1, len(delivered) + 1))
    assert seen[-1] == {"type": "token_expired",
                        "resume_after": delivered[-1] if delivered else 0}


@pytest.mark.own_api  # its divergence gives the shard an epoch; it asserts "0" before
async def test_a_diverged_stream_resets_with_its_epoch_and_resumes_in_it(
    service: Service, service_log: EventLog
) -> None:
    """A failover that lost seqs 8..10 (played on one node): a live client gets the diverged
    ``reset`` and then the new 8..13, never a reused seq silently; the events carry the new
    epoch, a resume in it gets no reset, a fresh client learns it; a bad epoch is refused."""
    sid, token = await service.create()
    await service_log.append_many([Envelope(type="note", session_id=sid,
                                            payload={"v": "old", "i": i}) for i in range(9)])
    assert await _last_seq(service_log, sid) == 10
    ws = await open_ws(service.url, sid, token)
    r = Reader(ws)
    await r.until_seq(10)
    assert r.others == []
    await lose_tail(service_log, sid, 7)
    await service_log.append_many([Envelope(type="note", session_id=sid,
                                            payload={"v": "new", "i": i}) for i in range(6)])
    with anyio.fail_after(30):
        while True:
            msg = await r.one()
            if msg["type"] == "reset":
                break
            assert msg["type"] == "events" and '"new"' not in json.dumps(msg), msg
    epoch = msg["epoch"]
    assert msg == {"type": "reset", "reason": "diverged", "after": 10, "resume_after": 7,
                   "epoch": epoch, "seen_epoch": "0", "first_available": 8}
    assert len(epoch) == 16 and epoch.isdigit()
    old = len(r.envelopes)
    batches: list[dict[str, Any]] = []
    with anyio.fail_after(30):
        while len(r.envelopes) < old + 6:
            batches.append(await r.one())
    new = r.envelopes[old:]
    assert [e["seq"] for e in new] == list(range(8, 14))
    assert [e["payload"] for e in new] == [{"v": "new", "i": i} for i in range(6)]
    assert all(b["type"] == "events" and b["epoch"] == epoch for b in batches)
    await ws.close()

    # a resume in the new epoch: no reset, the next event
    ws = await open_ws(service.url, sid, token, after=12, epoch=epoch)
    with anyio.fail_after(30):
        first = json.loads(await ws.recv())
    assert first["type"] == "events" and first["epoch"] == epoch
    assert [e["seq"] for e in first["events"]] == [13]
    await ws.close()
    # a client that connects after the divergence learns the epoch from the events
    ws = await open_ws(service.url, sid, token)
    r = Reader(ws)
    last: dict[str, Any] = {}
    with anyio.fail_after(30):
        while not r.envelopes or r.envelopes[-1]["seq"] < 13:
            last = await r.one()
    assert r.seqs == list(range(1, 14)) and r.others == [] and last["epoch"] == epoch
    await ws.close()
    # a bad epoch closes 1007 before anything is sent, and writes nothing
    for bad in ("x", "17", "0" * 16, 5):
        async with connect(ws_url(service.url, sid),
                           subprotocols=[SUBPROTOCOL, f"eventcore.token.{token}"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "hello", "after": 12, "epoch": bad}))
            code, _, seen = await close_code(ws)
        assert (code, seen) == (1007, []), bad
    assert await _last_seq(service_log, sid) == 13
