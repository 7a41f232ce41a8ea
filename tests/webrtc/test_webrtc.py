"""WebRTC data channels against the real service: a real aiortc peer in this process makes its
offer over HTTP to ``create_app`` served by uvicorn, on a real Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from divergence import lose_tail
from live_service import Service, serve
from webrtc_peer import Offer, connect

from eventcore import Envelope, EventLog, load_settings
from eventcore.server._http import input_event_key as http_input_event_key
from eventcore.server._webrtc import WebRTCLimits, input_event_key
from eventcore.server._webrtc_http import webrtc_service
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import RedisServer

DEADLINE = 60  # generous on a shared machine; nothing here measures time


def http_offer(svc: Service, session_id: str, credential: str) -> Offer:
    async def offer(sdp: str) -> str:
        async with svc.client(credential) as c:
            r = await c.post(f"/v1/sessions/{session_id}/webrtc",
                             json={"type": "offer", "sdp": sdp})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["type"] == "answer" and body["peer_id"].startswith("p_")
        answer: str = body["sdp"]
        return answer

    return offer


async def ready(peer: Any, **resume: Any) -> dict[str, Any]:
    peer.events.send(resume)
    msg: dict[str, Any] = await peer.events.receive()
    assert msg == {"control": "ready", "after": resume.get("after", 0)}
    return msg


async def test_events_and_inputs_over_a_real_peer(service: Service) -> None:
    sid, token = await service.create_session()
    log = service.log
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=0)
            assert (await peer.events.envelope())["type"] == "session.created"

            ack = await peer.request({"type": "input", "payload": {"text": "hi"},
                                      "idempotency_key": "k1", "id": 7})
            assert ack == {"type": "ack", "id": 7, "seq": 2, "duplicate": False}
            env = await peer.events.envelope()
            assert (env["seq"], env["type"], env["payload"]) == (2, "input", {"text": "hi"})

            # the same idempotency key dedupes over WebRTC and over HTTP alike
            again = await peer.request({"type": "input", "payload": {"text": "hi"},
                                        "idempotency_key": "k1", "id": 8})
            assert again == {"type": "ack", "id": 8, "seq": 2, "duplicate": True}
            async with service.client(token) as c:
                r = await c.post(f"/v1/sessions/{sid}/inputs",
                                 json={"payload": {"text": "hi"}, "idempotency_key": "k1"})
            assert r.json()["seq"] == 2

            sig = await peer.request({"type": "signal", "key": "mood", "value": {"ok": True},
                                      "id": "s"})
            assert sig["type"] == "ack" and sig["seq"] == 3
            env = await peer.events.envelope()
            assert env["type"] == "signal" and env["payload"] == {"key": "mood",
                                                                  "value": {"ok": True}}
            async with service.client(token) as c:
                r = await c.get(f"/v1/sessions/{sid}/signals", params={"since_seq": 2})
            assert [s["seq"] for s in r.json()["signals"]] == [3]

            await log.emit(sid, "message", {"text": "x"}, server_data={"secret": "s3cr3t"})
            env = await peer.events.envelope()
            assert env["seq"] == 4 and "server_data" not in env

            await log.end_session(sid)
            assert (await peer.events.envelope())["type"] == "session.ended"
            assert await peer.events.receive() == {"control": "end", "last_seq": 5}
            ended = await peer.request({"type": "input", "payload": 1, "id": 9})
            assert ended["type"] == "error" and ended["status"] == 409
    assert await log.last_seq(sid) == 5


async def test_events_resume_exactly_after_the_requested_seq(service: Service) -> None:
    sid, token = await service.create_session()
    for i in range(5):
        await service.log.emit(sid, "message", {"n": i})
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=3)
            got = [await peer.events.envelope() for _ in range(3)]
            assert [e["seq"] for e in got] == [4, 5, 6]
            await service.log.emit(sid, "message", {"n": 5})  # the seam: history -> live
            assert (await peer.events.envelope())["seq"] == 7
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=0, types=["message"])
            got = [await peer.events.envelope() for _ in range(6)]
            assert [e["payload"]["n"] for e in got] == list(range(6))
            assert {e["type"] for e in got} == {"message"}


async def test_an_envelope_larger_than_a_message_arrives_in_chunks(service: Service) -> None:
    sid, token = await service.create_session()
    big = "x" * 300_000  # also over the inline limit: stored as a blob, hydrated on read
    await service.log.emit(sid, "message", {"text": big})
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=1)
            env = await peer.events.envelope()
    assert env["seq"] == 2 and env["payload"]["text"] == big


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"type": "offer", "sdp": "this is not SDP"}, 400),
        ({"type": "offer", "sdp": "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"},
         400),
        ({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                                  "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"
                                  "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789012345678901\r\n"},
         400),
        ({"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * 20_000}, 422),
        ({"type": "answer", "sdp": "v=0"}, 422),
        ({"sdp": "v=0"}, 422),
        ({"type": "offer", "sdp": 5}, 422),
        ([], 422),
    ],
)
async def test_a_bad_offer_is_a_4xx_problem_and_writes_nothing(
    service: Service, body: Any, status: int
) -> None:
    sid, token = await service.create_session()
    before = await service.log.last_seq(sid)
    async with service.client(token) as c:
        r = await c.post(f"/v1/sessions/{sid}/webrtc", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    if status == 400:
        assert r.json()["type"].endswith(":invalid-offer")
    assert await service.log.last_seq(sid) == before
    assert not service.gateway.peers


async def test_a_malformed_json_body_is_400(service: Service) -> None:
    sid, token = await service.create_session()
    async with service.client(token) as c:
        r = await c.post(f"/v1/sessions/{sid}/webrtc", content=b"{nope",
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and await service.log.last_seq(sid) == 1


async def test_offers_are_authorized_like_every_session_endpoint(service: Service) -> None:
    sid, _ = await service.create_session()
    other_sid, other_token = await service.create_session()
    body = {"type": "offer", "sdp": "v=0"}
    async with service.client() as c:
        assert (await c.post(f"/v1/sessions/{sid}/webrtc", json=body)).status_code == 401
    async with service.client(other_token) as c:
        assert (await c.post(f"/v1/sessions/{sid}/webrtc", json=body)).status_code == 403
    async with service.client("not-a-token") as c:
        assert (await c.post(f"/v1/sessions/{sid}/webrtc", json=body)).status_code == 401
    async with service.client(service.api_key) as c:
        r = await c.post("/v1/sessions/no-such-session/webrtc",
                         json={"type": "offer", "sdp": await _valid_offer_sdp()})
        assert r.status_code == 404
    assert other_sid != sid and not service.gateway.peers


async def _valid_offer_sdp() -> str:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.createDataChannel("events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp: str = pc.localDescription.sdp
        return sdp
    finally:
        await pc.close()


async def test_a_read_only_token_streams_but_cannot_write(service: Service) -> None:
    sid, token = await service.create_session()
    async with service.client(token) as c:
        r = await c.post(f"/v1/sessions/{sid}/tokens", json={"scope": "read"})
    read_token = r.json()["token"]
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, read_token)) as peer:
            await ready(peer, after=0)
            assert (await peer.events.envelope())["seq"] == 1
            reply = await peer.request({"type": "input", "payload": 1, "id": 1})
            assert reply["type"] == "error" and reply["status"] == 403
    assert await service.log.last_seq(sid) == 1


async def test_malformed_channel_messages_get_errors_and_write_nothing(event_log: EventLog
                                                                       ) -> None:
    limits = WebRTCLimits(max_input_bytes=4096)
    async with serve(event_log, services=[functools.partial(webrtc_service, limits=limits)]
                     ) as svc:
        sid, token = await svc.create_session()
        hostile: list[Any] = [
            "not json", "[]", "null", '"input"', {"type": "input"}, {"type": "nope"},
            {"payload": 1}, {"type": "signal", "key": ""}, {"type": "signal", "key": 5},
            {"type": "signal", "key": "x" * 600}, {"type": "signal", "key": "a\u0000b"},
            {"type": "input", "payload": 1, "idempotency_key": ""},
            {"type": "input", "payload": 1, "extra": True},
            {"type": "input", "payload": 1, "id": {"nested": 1}},
            b"\xff\xfe\x00binary", b"", "",
            {"type": "input", "payload": "y" * 5000, "id": "big"},
            "{" * 3000,
        ]
        with anyio.fail_after(DEADLINE):
            async with connect(http_offer(svc, sid, token)) as peer:
                for msg in hostile:
                    reply = await peer.request(msg)
                    assert reply["type"] == "error" and 400 <= reply["status"] < 500, (msg, reply)
                big = await peer.request({"type": "input", "payload": "y" * 5000, "id": "big"})
                assert big["status"] == 413 and big["id"] == "big"
                # events: a bad first message is answered, then a good one still works
                for bad in ("garbage", {"after": -1}, {"after": "3"}, {"from": 0}, [1]):
                    peer.events.send(bad)
                    err = await peer.events.receive()
                    assert err["control"] == "error" and err["error"] == "bad_resume", err
                await ready(peer, after=0)
                assert (await peer.events.envelope())["seq"] == 1
                peer.events.send({"after": 0})
                assert (await peer.events.receive())["error"] == "already_streaming"
                # nothing was written, and the peer still works
                assert await event_log.last_seq(sid) == 1
                ok = await peer.request({"type": "input", "payload": {"fine": True}, "id": 1})
                assert ok == {"type": "ack", "id": 1, "seq": 2, "duplicate": False}
                assert (await peer.events.envelope())["payload"] == {"fine": True}


async def test_unknown_and_duplicate_channels_are_refused_but_the_peer_lives(
    service: Service,
) -> None:
    sid, token = await service.create_session()
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            from webrtc_peer import Channel

            odd = Channel(peer.pc.createDataChannel("admin"))
            dup = Channel(peer.pc.createDataChannel("inputs"))
            await odd.closed.wait()
            await dup.closed.wait()
            ack = await peer.request({"type": "input", "payload": 1, "id": 1})
            assert ack["type"] == "ack"
            odd.aclose()
            dup.aclose()


async def test_a_peer_that_closes_is_closed_and_its_tasks_freed(service: Service) -> None:
    sid, token = await service.create_session()
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=0)
            await peer.events.envelope()
            (server_peer,) = service.gateway.peers.values()
            assert service.ctx.hub.clients == 1
            await peer.request({"type": "input", "payload": 1})
            await peer.request({"type": "input"})
            m = await _metrics(service)
            assert (m["peers"], m["inputs_accepted"], m["inputs_rejected"]) == (1, 1, 1)
            assert m["events_sent"] >= 1
        await server_peer.closed.wait()
    assert (await _metrics(service))["peers"] == 0
    assert not service.gateway.peers
    assert server_peer.pc.connectionState == "closed"
    assert service.ctx.hub.clients == 0  # the hub subscription went with it
    assert not _peer_tasks(server_peer.peer_id)


async def _metrics(service: Service) -> dict[str, float]:
    async with service.client() as c:
        r = await c.get("/metrics")
    prefix = "eventcore_webrtc_"
    return {name.removeprefix(prefix): float(value) for name, value in
            (line.split() for line in r.text.splitlines() if line.startswith(prefix))}


def _peer_tasks(peer_id: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if peer_id in t.get_name() and not t.done()]


def test_input_keys_match_the_http_endpoint() -> None:
    assert input_event_key("abc") == http_input_event_key("abc") == "input:abc"


async def test_a_peer_limit_answers_503(event_log: EventLog) -> None:
    limits = WebRTCLimits(max_peers_per_session=1)
    async with serve(event_log, services=[functools.partial(webrtc_service, limits=limits)]
                     ) as svc:
        sid, token = await svc.create_session()
        with anyio.fail_after(DEADLINE):
            async with connect(http_offer(svc, sid, token)):
                async with svc.client(token) as c:
                    r = await c.post(f"/v1/sessions/{sid}/webrtc",
                                     json={"type": "offer", "sdp": await _valid_offer_sdp()})
                assert r.status_code == 503 and r.headers["retry-after"]
                assert len(svc.gateway.peers) == 1


async def test_shutdown_tells_peers_and_closes_them(event_log: EventLog) -> None:
    with anyio.fail_after(DEADLINE):
        async with serve(event_log) as svc:
            sid, token = await svc.create_session()
            peer_cm = connect(http_offer(svc, sid, token))
            peer = await peer_cm.__aenter__()
            try:
                await ready(peer, after=0)
                await peer.events.envelope()
                (server_peer,) = svc.gateway.peers.values()
                svc.server.should_exit = True
                msg = await peer.events.receive()
                assert msg["control"] == "error" and msg["error"] == "shutting_down"
                assert msg["retry"] is True and msg["last_seq"] == 1
                await peer.events.closed.wait()
                await server_peer.closed.wait()
            finally:
                await peer_cm.__aexit__(None, None, None)
    assert server_peer.pc.connectionState == "closed"


async def test_offer_after_shutdown_began_is_refused(event_log: EventLog) -> None:
    async with serve(event_log) as svc:
        sid, token = await svc.create_session()
        svc.ctx.shutdown.set()
        async with svc.client(token) as c:
            r = await c.post(f"/v1/sessions/{sid}/webrtc",
                             json={"type": "offer", "sdp": await _valid_offer_sdp()})
        assert r.status_code == 503




async def test_a_peer_that_vanishes_is_detected_and_closed(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the peer's process: nothing says goodbye, so the server notices through ICE
    consent freshness (RFC 7675). Its check interval is shortened here (5 s in aioice) so
    the test does not wait half a minute; the mechanism is the real one."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import aioice.ice

    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    sid, token = await service.create_session()
    script = Path(__file__).with_name("peer_process.py")
    with anyio.fail_after(DEADLINE):
        async with await anyio.open_process(
            [sys.executable, str(script), service.url, sid, token], stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as proc:
            assert proc.stdout is not None
            line = await proc.stdout.receive()
            assert line.startswith(b"ready 1"), line
            (server_peer,) = service.gateway.peers.values()
            assert service.ctx.hub.clients == 1
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await server_peer.closed.wait()
    assert not service.gateway.peers
    assert service.ctx.hub.clients == 0
    assert not _peer_tasks(server_peer.peer_id)


async def test_invalid_utf8_text_disconnects_only_that_peer(service: Service) -> None:
    """aiortc decodes text messages strictly; invalid UTF-8 ends that peer's receive loop.
    The server must close that peer promptly and keep serving everyone else."""
    from aiortc.rtcsctptransport import WEBRTC_STRING

    sid, token = await service.create_session()
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as good:
            async with connect(http_offer(service, sid, token)) as bad:
                hostile = next(p for p in service.gateway.peers.values()
                               if p.pc is not None and p not in _peers_of(service, good))
                ch = bad.inputs.channel
                # what a text message with broken encoding looks like on the wire
                ch.transport._data_channel_queue.append((ch, WEBRTC_STRING, b"\xff\xfe{"))
                await ch.transport._data_channel_flush()
                await hostile.closed.wait()
            ack = await good.request({"type": "input", "payload": 1, "id": 1})
            assert ack["type"] == "ack" and ack["seq"] == 2
    assert await service.log.last_seq(sid) == 2


def _peers_of(service: Service, client: Any) -> list[Any]:
    """The server-side peer(s) whose DTLS fingerprint matches this client's certificate."""
    local = client.pc.localDescription.sdp
    return [p for p in service.gateway.peers.values()
            if p.pc.remoteDescription is not None
            and _fingerprint(p.pc.remoteDescription.sdp) == _fingerprint(local)]


def _fingerprint(sdp: str) -> str:
    return next(line for line in sdp.splitlines() if line.startswith("a=fingerprint"))


async def test_closing_the_events_channel_stops_its_follower_and_a_new_one_resumes(
    service: Service,
) -> None:
    sid, token = await service.create_session()
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=0)
            assert (await peer.events.envelope())["seq"] == 1
            assert service.ctx.hub.clients == 1
            peer.events.channel.close()
            await peer.events.closed.wait()
            await _hub_clients_drop_to(service, 0)
            await service.log.emit(sid, "message", {"n": 1})
            from webrtc_peer import Channel

            again = Channel(peer.pc.createDataChannel("events"))
            await again.opened.wait()
            again.send({"after": 1})
            assert await again.receive() == {"control": "ready", "after": 1}
            assert (await again.envelope())["seq"] == 2
            assert service.ctx.hub.clients == 1 and len(service.gateway.peers) == 1
            again.aclose()


async def _hub_clients_drop_to(service: Service, n: int) -> None:
    """Wait for the server to let go of its hub subscription: the follower task ends when it
    is cancelled, so wait on that task rather than on time."""
    tasks = [t for t in asyncio.all_tasks() if t.get_name().endswith(" events")]
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(t)
    assert service.ctx.hub.clients == n


@pytest.mark.redis_restart
async def test_events_continue_across_a_redis_restart(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    settings = load_settings(redis_url=server.url, namespace=unique_namespace(), shards=4,
                             retry_budget_s=10)
    async with EventLog(settings) as log, serve(log) as svc:
        sid, token = await svc.create_session()
        with anyio.fail_after(DEADLINE):
            async with connect(http_offer(svc, sid, token)) as peer:
                await ready(peer, after=0)
                got = [await peer.events.envelope()]
                await anyio.to_thread.run_sync(server.kill)  # SIGKILL; AOF fsync=always
                await anyio.to_thread.run_sync(server.start)
                for i in range(3):
                    await log.emit(sid, "message", {"n": i})
                ack = await peer.request({"type": "input", "payload": "after restart"})
                assert ack["type"] == "ack" and ack["seq"] == 5
                while len(got) < 5:
                    got.append(await peer.events.envelope())
    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]


async def test_a_peer_does_not_outlive_its_token(service: Service) -> None:
    sid, token = await service.create_session()
    async with service.client(token) as c:
        r = await c.post(f"/v1/sessions/{sid}/tokens", json={"scope": "rw", "ttl_s": 2})
    short = r.json()["token"]
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, short)) as peer:
            await ready(peer, after=0)
            assert (await peer.events.envelope())["seq"] == 1
            (server_peer,) = service.gateway.peers.values()
            await server_peer.closed.wait()
            assert time.time() >= _exp(short)  # closed at the token's expiry, not before
            # and the events channel said why, and where to resume, before it closed
            assert await peer.events.receive() == {"control": "token_expired", "last_seq": 1}
            await peer.events.closed.wait()
    assert not service.gateway.peers


def _stop_acknowledging(pc: Any) -> None:
    """From now on this peer's SCTP drops every DATA chunk unacknowledged: on the wire, a peer
    whose application stopped reading. (aiortc ignores the receive window it is told, so only
    missing acknowledgements make the server's send buffer back up.)"""

    async def drop(chunk: Any) -> None:
        return None

    pc.sctp._receive_data_chunk = drop


async def test_a_peer_that_stops_reading_is_closed_after_the_send_timeout(
    event_log: EventLog,
) -> None:
    """ICE consent still succeeds, so nothing else would ever close it: it would pin its
    follower and a high-water mark of unsent data for as long as its credential lasts (for
    the API key, forever)."""
    limits = WebRTCLimits(send_timeout_s=1.0, high_water_bytes=128 * 1024)
    async with serve(event_log, services=[functools.partial(webrtc_service, limits=limits)]
                     ) as svc:
        sid, _ = await svc.create_session()
        with anyio.fail_after(DEADLINE):
            async with connect(http_offer(svc, sid, svc.api_key)) as peer:
                await ready(peer, after=0)
                assert (await peer.events.envelope())["seq"] == 1
                (server_peer,) = svc.gateway.peers.values()
                _stop_acknowledging(peer.pc)
                for i in range(32):  # 512 KiB: well over the high-water mark
                    await svc.log.emit(sid, "message", {"i": i, "x": "x" * 16 * 1024})
                await server_peer.closed.wait()
        assert svc.gateway.stats.slow_closed == 1
        assert svc.ctx.hub.clients == 0


def _exp(jwt: str) -> int:
    claims = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))
    exp: int = claims["exp"]
    return exp


async def _delete_and_create_again(service: Service, sid: str) -> None:
    """DELETE over HTTP, then the id created again, with events of its own."""
    old = (await service.log.get_session(sid)).incarnation
    async with service.client(service.api_key) as c:
        assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204
    again = await service.log.create_session("echo", session_id=sid)
    assert again.incarnation != old
    for i in range(3):
        await service.log.emit(sid, "message", {"gen": "new", "i": i})


@pytest.mark.parametrize("credential", ["token", "api key"])
async def test_an_events_channel_never_crosses_into_the_session_created_again(
    service: Service, credential: str
) -> None:
    """A peer opened before the DELETE asks for events once the id names a new session: it
    gets session_deleted, then the peer closes. Before, it streamed the new session."""
    sid, token = await service.create_session()
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token if credential == "token"
                                      else service.api_key)) as peer:
            (server_peer,) = service.gateway.peers.values()
            inc = (await service.log.get_session(sid)).incarnation
            await _delete_and_create_again(service, sid)
            await ready(peer, after=0)
            assert await peer.events.receive() == {"control": "session_deleted", "last_seq": 0,
                                                   "incarnation": inc}
            await server_peer.closed.wait()
            await peer.events.closed.wait()
    assert not service.gateway.peers and service.ctx.hub.clients == 0


async def test_inputs_of_a_peer_never_land_in_the_session_created_again(service: Service
                                                                        ) -> None:
    """The peer's events channel ended with its session (session.ended, reason deleted);
    an input sent on it once the id names a new session is refused, and the peer closes.
    Before, it was appended to the new session."""
    sid, token = await service.create_session()
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            (server_peer,) = service.gateway.peers.values()
            await ready(peer, after=0)
            assert (await peer.events.envelope())["type"] == "session.created"
            await _delete_and_create_again(service, sid)
            ended = await peer.events.envelope()
            assert ended["type"] == "session.ended" and ended["payload"]["reason"] == "deleted"
            assert await peer.events.receive() == {"control": "end", "last_seq": 2}
            reply = await peer.request({"type": "input", "payload": {"gen": "old"}, "id": 1})
            assert reply == {"type": "error", "id": 1, "status": 404, "error": "session_deleted",
                             "detail": f"session {sid!r} was deleted (its id may name a new "
                                       "session now)"}
            await server_peer.closed.wait()
    assert [e.type for e in await service.log.read(sid)] == ["session.created"] + ["message"] * 3


async def test_a_diverged_stream_resets_with_its_epoch_and_resumes_in_it(
    service: Service,
) -> None:
    """A failover that lost seqs 8..10 (played on one node): a live events channel gets the
    ``reset`` control and then the new 8..13, never a reused seq silently; a resume in the new
    epoch gets no reset; a fresh one is told the epoch before its first envelope; a bad epoch
    is a ``bad_resume`` error."""
    sid, token = await service.create_session()
    log = service.log
    await log.append_many([Envelope(type="note", session_id=sid, payload={"v": "old", "i": i})
                           for i in range(9)])
    assert await log.last_seq(sid) == 10
    with anyio.fail_after(DEADLINE):
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=0)
            assert [(await peer.events.envelope())["seq"] for _ in range(10)] == list(
                range(1, 11))
            await lose_tail(log, sid, 7)
            await log.append_many([Envelope(type="note", session_id=sid,
                                            payload={"v": "new", "i": i}) for i in range(6)])
            reset = await peer.events.receive()  # nothing of the new history before it
            epoch = reset.get("epoch")
            assert reset == {"control": "reset", "reason": "diverged", "after": 10,
                             "resume_after": 7, "epoch": epoch, "seen_epoch": "0",
                             "first_available": 8}
            assert isinstance(epoch, str) and len(epoch) == 16 and epoch.isdigit()
            new = [await peer.events.envelope() for _ in range(6)]  # no epoch notice: said
            assert [e["seq"] for e in new] == list(range(8, 14))
            assert [e["payload"] for e in new] == [{"v": "new", "i": i} for i in range(6)]
        async with connect(http_offer(service, sid, token)) as peer:
            await ready(peer, after=12, epoch=epoch)
            assert (await peer.events.envelope())["seq"] == 13  # no reset, no notice
        async with connect(http_offer(service, sid, token)) as peer:
            for bad in ("x", "17", "0" * 16, 5):
                peer.events.send({"after": 12, "epoch": bad})
                err = await peer.events.receive()
                assert err["control"] == "error" and err["error"] == "bad_resume", err
            await ready(peer, after=0)
            got = [await peer.events.envelope() for _ in range(7)]
            assert [e["seq"] for e in got] == list(range(1, 8))
            assert await peer.events.receive() == {"control": "epoch", "epoch": epoch}
            assert [(await peer.events.envelope())["seq"] for _ in range(6)] == list(
                range(8, 14))
    assert await log.last_seq(sid) == 13
