"""SSE streams opened before a DELETE, on a real API process: whether behind (catching up) or
live, a stream of the deleted session ends, and never carries an event of the session later
created under the same id (whose seqs restart at 1), for session tokens and the API key alike."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from service_support import API_KEY, Service

from eventcore import Envelope, EventLog

KEY = {"Authorization": f"Bearer {API_KEY}"}


async def _create(c: httpx.AsyncClient, key: str, gen: str) -> tuple[str, str, str]:
    r = await c.post("/v1/sessions", json={"agent": "echo", "metadata": {"gen": gen},
                                           "idempotency_key": key}, headers=KEY)
    assert r.status_code == 201, r.text
    body = r.json()
    return body["session_id"], body["incarnation"], body["token"]


async def _delete_and_create_again(c: httpx.AsyncClient, log: EventLog, sid: str, key: str,
                                   old_inc: str, events: int) -> None:
    assert (await c.delete(f"/v1/sessions/{sid}", headers=KEY)).status_code == 204
    again, inc, _ = await _create(c, key, "new")
    assert again == sid and inc != old_inc
    # more events than the old session had: the new seqs pass every old stream's cursor
    await log.append_many([Envelope(type="note", session_id=sid, payload={"gen": "new", "i": i})
                           for i in range(events)])


async def _to_the_end(events: AsyncIterator[ServerSentEvent], seen: list[ServerSentEvent]
                      ) -> None:
    with anyio.fail_after(30):
        async for ev in events:
            assert '"new"' not in ev.data, f"an event of the new session: {ev.event} {ev.data}"
            seen.append(ev)


def _check_old_stream(seen: list[ServerSentEvent], inc: str) -> None:
    """Envelopes of the old session only, in seq order from 1, then the final event."""
    *envelopes, last = seen
    seqs = [int(e.id) for e in envelopes]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert all(json.loads(e.data).get("payload", {}).get("gen", "old") == "old"
               for e in envelopes[1:])
    assert json.loads(envelopes[0].data)["payload"]["labels"] == {"gen": "old"}
    if last.event == "session.ended":  # it had caught up: the delete ends the session first
        assert json.loads(last.data)["payload"]["reason"] == "deleted"
    else:
        # no id: of its own (httpx-sse reports the last one seen, as EventSource keeps it)
        assert last.event == "session.deleted" and last.id == str(seqs[-1])
        assert json.loads(last.data) == {"last_seq": seqs[-1], "incarnation": inc}


async def test_streams_behind_at_a_delete_end_with_session_deleted(
    shared_service: Service, shared_log: EventLog
) -> None:
    """Two streams (session token, API key) stop reading an 8 MiB history after its first
    event, so the server is mid catch-up for them when the session is deleted and created
    again with 400 events. Before, they went on with the new session's seqs after their
    cursors."""
    key = f"k-{uuid.uuid4().hex}"
    # a fixed receive buffer (no autotuning): the server's sends back up soon after the client
    # stops reading
    small = httpx.AsyncHTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                      64 * 1024)])
    async with shared_service.client() as c, \
            httpx.AsyncClient(base_url=shared_service.url, transport=small, timeout=60) as slow:
        sid, inc, token = await _create(c, key, "old")
        big = "x" * 32 * 1024
        await shared_log.append_many([Envelope(type="note", session_id=sid,
                                               payload={"gen": "old", "i": i, "x": big})
                                      for i in range(256)])
        seen: dict[str, list[ServerSentEvent]] = {"token": [], "key": []}
        path = f"/v1/sessions/{sid}/events"
        async with aconnect_sse(slow, "GET", path,
                                headers={"Authorization": f"Bearer {token}"}) as by_token, \
                aconnect_sse(slow, "GET", path, headers=KEY) as by_key:
            streams: dict[str, AsyncIterator[Any]] = {"token": by_token.aiter_sse(),
                                                      "key": by_key.aiter_sse()}
            for name, it in streams.items():
                with anyio.fail_after(30):
                    seen[name].append(await it.__anext__())
                assert seen[name][0].id == "1"
            await _delete_and_create_again(c, shared_log, sid, key, inc, 400)
            async with anyio.create_task_group() as tg:
                for name, it in streams.items():
                    tg.start_soon(_to_the_end, it, seen[name])
        for name in streams:
            assert seen[name][-1].event == "session.deleted", (name, seen[name][-1])
            _check_old_stream(seen[name], inc)

        # reopening: the old token gets 401 (SSE and JSON pages); the API key gets the new one
        old = {"Authorization": f"Bearer {token}"}
        assert (await c.get(path, headers=old)).status_code == 401
        assert (await c.get(f"{path}?format=json", headers=old)).status_code == 401
        page = (await c.get(f"{path}?format=json&limit=2", headers=KEY)).json()
        assert page["events"][0]["payload"]["labels"] == {"gen": "new"}


async def test_live_streams_end_at_a_delete_and_never_see_the_next_session(
    shared_service: Service, shared_log: EventLog
) -> None:
    key = f"k-{uuid.uuid4().hex}"
    async with shared_service.client() as c:
        sid, inc, token = await _create(c, key, "old")
        await shared_log.append_many([Envelope(type="note", session_id=sid,
                                               payload={"gen": "old", "i": i})
                                      for i in range(5)])
        seen: dict[str, list[ServerSentEvent]] = {"token": [], "key": []}
        path = f"/v1/sessions/{sid}/events"
        async with aconnect_sse(c, "GET", path,
                                headers={"Authorization": f"Bearer {token}"}) as by_token, \
                aconnect_sse(c, "GET", path, headers=KEY) as by_key:
            streams: dict[str, AsyncIterator[Any]] = {"token": by_token.aiter_sse(),
                                                      "key": by_key.aiter_sse()}
            for name, it in streams.items():
                with anyio.fail_after(30):
                    while not seen[name] or seen[name][-1].id != "6":  # caught up: live
                        seen[name].append(await it.__anext__())
            await _delete_and_create_again(c, shared_log, sid, key, inc, 20)
            async with anyio.create_task_group() as tg:
                for name, it in streams.items():
                    tg.start_soon(_to_the_end, it, seen[name])
        for name in streams:
            _check_old_stream(seen[name], inc)
