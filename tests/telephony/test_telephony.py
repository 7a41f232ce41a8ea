"""Telephony media streams against the real API process: a fake provider client per provider
(real WebSocket client, each provider's documented message shapes); the test plays the agent
by appending the session's output events."""

from __future__ import annotations

import base64
import json
from typing import Any

import anyio
import pytest
from providers import PROVIDERS, make
from service_support import Service
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from eventcore import Envelope, EventLog
from eventcore.server._telephony import detect

NAMES = sorted(PROVIDERS)
FRAME = bytes(range(160))  # 20 ms of 8 kHz mu-law (or 10 ms of 16-bit PCM)


async def _start(service: Service, **body: Any) -> dict[str, Any]:
    async with service.client() as c:
        r = await c.post("/v1/telephony/start", json={"agent": "echo", **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["url"].startswith("ws://127.0.0.1:")
    assert "/v1/telephony/ws?token=" in out["url"]
    return out


async def _inputs(log: EventLog, sid: str) -> list[Envelope]:
    return [e for e in await log.read(sid, 0, 10_000) if e.type == "input"
            and isinstance(e.payload, dict) and "telephony" in e.payload]


async def _until_inputs(log: EventLog, sid: str, pred: Any, limit_s: float = 20
                        ) -> list[Envelope]:
    with anyio.fail_after(limit_s):
        while True:
            got = await _inputs(log, sid)
            if pred(got):
                return got
            await anyio.sleep(0.05)


def _kinds(envs: list[Envelope]) -> list[str]:
    return [e.payload["telephony"] for e in envs]


async def _close(ws: Any, limit_s: float = 15) -> tuple[int, str, list[dict[str, Any]]]:
    seen = []
    with anyio.fail_after(limit_s):
        try:
            while True:
                seen.append(json.loads(await ws.recv()))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, exc
            return exc.rcvd.code, exc.rcvd.reason, seen


def test_detection_is_unambiguous() -> None:
    for name in NAMES:
        p = make(name)
        msgs = p.handshake()
        first, second = msgs[0], (msgs[1] if len(msgs) > 1 else None)
        found = detect(first, second)
        assert found is not None, name
        framing, start = found
        assert (framing.name, start.call_id, start.stream_id) == (name, p.call_id, p.stream_id)
        assert start.account_id == p.account_id
    assert detect({"event": "connected"}, {"event": "start"}) is None
    assert detect({"event": "media"}, None) is None


@pytest.mark.parametrize("name", NAMES)
async def test_full_call(service: Service, service_log: EventLog, name: str) -> None:
    call = await _start(service, provider=name)
    sid = call["session_id"]
    p = make(name)
    ws = await p.connect(call["url"])
    got = await _until_inputs(service_log, sid, lambda g: _kinds(g) == ["start"])
    start = got[0]
    assert start.payload["provider"] == name
    assert start.server_data == {"telephony": {"provider": name, "call_id": p.call_id,
                                               "stream_id": p.stream_id,
                                               "account_id": p.account_id}}
    # audio is batched: one entry per 200 ms of audio, the rest flushed before the DTMF
    for _ in range(25):
        await p.send(p.media(FRAME))
    await p.send(p.dtmf("5"))
    got = await _until_inputs(service_log, sid, lambda g: "dtmf" in _kinds(g))
    audio = [e.payload for e in got if e.payload["telephony"] == "audio"]
    per = (16000 if name == "exotel" else 8000) * 200 // 1000 // len(FRAME)
    assert [a["frames"] for a in audio] == [per] * (25 // per) + [25 % per]
    assert b"".join(base64.b64decode(a["audio"]) for a in audio) == FRAME * 25
    assert got[-1].payload == {"telephony": "dtmf", "digit": "5"}
    # the agent's output reaches the provider in its own format
    audio_out = base64.b64encode(b"\x7f" * 320).decode()
    for typ, payload in [("telephony.play", {"audio": audio_out}),
                         ("telephony.mark", {"name": "greeting"}), ("telephony.clear", {})]:
        await service_log.append(Envelope(type=typ, session_id=sid, payload=payload))
    with anyio.fail_after(20):
        assert await p.recv() == p.expected_play(audio_out)
        assert await p.recv() == p.expected_mark("greeting")
        assert await p.recv() == p.expected_clear()
    await p.send(p.mark_played("greeting"))
    await _until_inputs(service_log, sid, lambda g: "mark" in _kinds(g))
    await p.hang_up()
    got = await _until_inputs(service_log, sid, lambda g: "stop" in _kinds(g))
    assert _kinds(got) == ["start"] + ["audio"] * len(audio) + ["dtmf", "mark", "stop"]
    assert got[-2].payload == {"telephony": "mark", "name": "greeting"}
    assert got[-1].payload["reason"] in ("stop", "callended", "socket_closed")
    # the provider's ids are server data: no client sees them
    async with service.client() as c:
        page = (await c.get(f"/v1/sessions/{sid}/events", params={"format": "json"})).text
    assert p.call_id not in page and p.stream_id not in page
    assert ws.close_code is not None


@pytest.mark.parametrize("name", NAMES)
async def test_agent_hangup_closes_the_stream(service: Service, service_log: EventLog,
                                              name: str) -> None:
    call = await _start(service, provider=name)
    sid = call["session_id"]
    p = make(name)
    ws = await p.connect(call["url"])
    await _until_inputs(service_log, sid, lambda g: _kinds(g) == ["start"])
    await service_log.append(Envelope(type="telephony.hangup", session_id=sid, payload={}))
    code, reason, seen = await _close(ws)
    assert (code, seen) == (1000, [])
    assert reason == "hangup"
    got = await _until_inputs(service_log, sid, lambda g: "stop" in _kinds(g))
    assert got[-1].payload == {"telephony": "stop", "reason": "hangup"}


@pytest.mark.parametrize("name", NAMES)
async def test_reconnect_joins_the_same_session(service: Service, service_log: EventLog,
                                                name: str) -> None:
    call = await _start(service)
    sid = call["session_id"]
    first = make(name)
    ws = await first.connect(call["url"])
    await _until_inputs(service_log, sid, lambda g: _kinds(g) == ["start"])
    await service_log.append(Envelope(type="telephony.mark", session_id=sid,
                                      payload={"name": "before"}))
    with anyio.fail_after(20):
        assert await first.recv() == first.expected_mark("before")
    await ws.close()  # the network drops; no stop
    await _until_inputs(service_log, sid, lambda g: _kinds(g) == ["start", "stop"])
    # the provider reconnects to the same URL with a new stream
    again = make(name)
    again.call_id = first.call_id
    ws2 = await again.connect(call["url"])
    got = await _until_inputs(service_log, sid,
                              lambda g: _kinds(g) == ["start", "stop", "start"])
    assert got[-1].server_data["telephony"]["stream_id"] == again.stream_id
    assert got[-1].server_data["telephony"]["call_id"] == first.call_id
    await service_log.append(Envelope(type="telephony.mark", session_id=sid,
                                      payload={"name": "after"}))
    with anyio.fail_after(20):  # only what came after the new start: nothing replayed
        assert await again.recv() == again.expected_mark("after")
    await again.send(again.dtmf("#"))
    await _until_inputs(service_log, sid, lambda g: _kinds(g)[-1] == "dtmf")
    await again.hang_up()
    await ws2.wait_closed()


async def _refused(url: str, frames: list[Any]) -> tuple[int, str]:
    async with connect(url) as ws:
        for f in frames:
            try:
                await ws.send(f if isinstance(f, str | bytes) else json.dumps(f))
            except ConnectionClosed:
                break
        code, reason, seen = await _close(ws)
        assert seen == []
        return code, reason


async def test_bad_handshakes_are_refused(service: Service, service_log: EventLog) -> None:
    call = await _start(service, provider="twilio")
    sid, url = call["session_id"], call["url"]
    code, reason = await _refused(url, [{"event": "connected"}, {"event": "start",
                                                                 "hello": 1}])
    assert code == 4400 and "unknown handshake" in reason
    code, reason = await _refused(url, [{"event": "media", "media": {"payload": "AA=="}}])
    assert code == 4400 and "unknown handshake" in reason
    assert (await _refused(url, ["not json"]))[0] == 1007
    assert (await _refused(url, [b"\x00binary"]))[0] == 1003
    code, reason = await _refused(url, make("plivo").handshake())  # a twilio call
    assert code == 4400 and "expects twilio" in reason
    # credentials: none, a forged one, and a session token (another audience)
    base = url.split("?")[0]
    assert (await _refused(base, make("twilio").handshake()))[0] == 4401
    assert (await _refused(base + "?token=x.y.z", make("twilio").handshake()))[0] == 4401
    async with service.client() as c:
        session_token = (await c.post("/v1/sessions", json={"agent": "echo"})).json()["token"]
    assert (await _refused(f"{base}?token={session_token}", make("twilio").handshake()))[0] \
        == 4401
    # nothing was written by any of them
    assert await _inputs(service_log, sid) == []
    # and the call token is not a session credential either
    token = url.split("token=")[1]
    async with service.client(token) as c:
        assert (await c.get(f"/v1/sessions/{sid}")).status_code == 401


async def test_start_needs_the_api_key(service: Service) -> None:
    _, token = await service.create()
    async with service.client(token) as c:
        r = await c.post("/v1/telephony/start", json={"agent": "echo"})
    assert r.status_code == 403
    async with service.client() as c:
        r = await c.post("/v1/telephony/start", json={"agent": "echo", "provider": "skype"})
    assert r.status_code == 422
