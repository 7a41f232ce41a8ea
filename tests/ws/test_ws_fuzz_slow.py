"""Hypothesis fuzz of the client messages, and a client that stops reading."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_support import API_KEY, Service
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from ws_client import SUBPROTOCOL, Reader, open_ws, ws_url

from eventcore import Envelope, EventLog

PROTOCOL_CLOSES = {1003, 1007, 1008, 1009}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
ids = st.none() | st.integers(-10, 10**6) | st.text(max_size=140)
keys = st.text(min_size=0, max_size=20) | st.sampled_from(["k", "k2", "a" * 600, "\x00"])
valid = st.one_of(
    st.builds(lambda p, k, i: {"type": "input", "payload": p, "idempotency_key": k, "id": i},
              json_values, st.none() | keys, ids),
    st.builds(lambda k, v, i: {"type": "signal", "key": k, "value": v, "id": i},
              keys, json_values, ids),
)
junk = st.one_of(
    st.text(max_size=50),
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.text(max_size=8), json_values,
                                                       max_size=4)),
    st.builds(lambda t, p: json.dumps({"type": t, "payload": p}), st.text(max_size=10),
              json_values),
    st.binary(max_size=30),
)
messages = st.lists(st.one_of(valid.map(json.dumps), junk), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=messages)
async def test_fuzz_client_messages(service: Service, service_log: EventLog,
                                    batch: list[Any]) -> None:
    """Every frame gets an ack/error and the connection stays, or it closes with a documented
    protocol code; exactly the acked new entries are written."""
    sid, _ = await service.create()
    before = (await service_log.get_session(sid)).last_seq
    ws = await open_ws(service.url, sid, API_KEY, after=before)
    r = Reader(ws)
    new = 0
    try:
        for frame in batch:
            await ws.send(frame)
            reply = await r.reply()
            if reply["type"] == "ack" and not reply["duplicate"]:
                new += 1
            else:
                assert reply["type"] == "ack" or 400 <= reply["status"] < 500, reply
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code in PROTOCOL_CLOSES, exc
    finally:
        await ws.close()
    assert (await service_log.get_session(sid)).last_seq == before + new


async def _watched(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics")).text
    m = re.search(r"^eventcore_hub_watched_sessions (\S+)$", text, re.M)
    assert m is not None
    return float(m.group(1))


async def test_client_that_stops_reading_is_disconnected(
    service: Service, service_log: EventLog
) -> None:
    sid, token = await service.create()
    blob = "y" * 50_000
    for i in range(400):  # ~20 MB: more than the socket buffers of both ends hold
        await service_log.append(Envelope(type="input", session_id=sid,
                                          payload={"i": i, "blob": blob}))
    # max_queue=1: the client library stops reading the socket once one frame is unread
    ws = await connect(ws_url(service.url, sid),
                       subprotocols=[SUBPROTOCOL, f"eventcore.token.{token}"],  # type: ignore[list-item]
                       max_size=None, max_queue=1)
    await ws.send(json.dumps({"type": "hello", "after": 0}))
    async with service.client() as c:
        with anyio.fail_after(30):
            while await _watched(c) != 1:  # noqa: ASYNC110 - state in another process
                await anyio.sleep(0.05)
        with anyio.fail_after(60):  # the send timeout is 3 s in these tests
            while await _watched(c) != 0:  # noqa: ASYNC110 - dropped, never having read
                await anyio.sleep(0.1)
        # the server is fine: a reading client gets everything
        ws2 = await open_ws(service.url, sid, token)
        r = Reader(ws2)
        await r.until_seq(401, limit_s=60)
        assert r.seqs == list(range(1, 402))
        await ws2.close()
    ws.transport.abort()
