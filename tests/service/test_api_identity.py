"""Identity: a session id deleted and created again (the same idempotency key) is a new session.
It shows nothing of the old one, and the old one's tokens open nothing of it."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
from service_support import API_KEY, Service

from eventcore import EventLog, RunPayload
from eventcore.subscribers import read_view

PROBLEM = "application/problem+json"


async def _projected(c: httpx.AsyncClient, sid: str, ok: Any) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            r = await c.get(f"/v1/sessions/{sid}")
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["projection"] is not None and ok(body["projection"]):
                return body
            await anyio.sleep(0.05)  # the projector runs in the API process: poll it


def _every_endpoint(sid: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    base = f"/v1/sessions/{sid}"
    return [
        ("GET", base, None),
        ("GET", f"{base}/events", None),  # SSE
        ("GET", f"{base}/events?format=json", None),
        ("GET", f"{base}/signals", None),
        ("POST", f"{base}/inputs", {"payload": {"text": "from the old token"}}),
        ("POST", f"{base}/signals", {"key": "old", "value": 1}),
        ("POST", f"{base}/tokens", {"scope": "read"}),
        ("POST", f"{base}/cancel", {}),
        ("DELETE", base, None),
    ]


async def test_delete_then_create_again_is_a_new_session(
    shared_service: Service, shared_log: EventLog
) -> None:
    key = f"order-{uuid.uuid4().hex}"
    async with shared_service.client() as c:
        r = await c.post("/v1/sessions", json={"agent": "echo", "metadata": {"gen": "old"},
                                               "idempotency_key": key})
        assert r.status_code == 201
        sid, old_token = r.json()["session_id"], r.json()["token"]
        old = {"Authorization": f"Bearer {old_token}"}
        await c.post(f"/v1/sessions/{sid}/inputs", json={"payload": {"text": "old"}})
        await c.post(f"/v1/sessions/{sid}/signals", json={"key": "old-signal", "value": 1})
        await shared_log.emit(sid, "run.started", RunPayload(name="old-run"), run_id="r-old")
        await _projected(c, sid, lambda p: p["runs"] and "old-signal" in p["signals"])
        old_read = (await c.post(f"/v1/sessions/{sid}/tokens", headers=old,
                                 json={"scope": "read"})).json()["token"]

        assert (await c.delete(f"/v1/sessions/{sid}", headers=old)).status_code == 204
        assert await read_view(shared_log, sid) is None  # the view goes at once
        r = await c.get(f"/v1/sessions/{sid}", headers=old)
        assert r.status_code == 404

        r = await c.post("/v1/sessions", json={"agent": "echo", "metadata": {"gen": "new"},
                                               "idempotency_key": key})
        assert r.status_code == 201 and r.json()["session_id"] == sid  # the key names the id
        new_token = r.json()["token"]
        body = await _projected(c, sid, lambda p: True)
        assert body["labels"] == {"gen": "new"} and body["last_seq"] == 1
        projection = body["projection"]
        assert projection["labels"] == {"gen": "new"}
        assert projection["runs"] == [] and projection["signals"] == {}
        assert projection["counts"] == {"session.created": 1}
        page = (await c.get(f"/v1/sessions/{sid}/events?format=json")).json()
        assert [e["type"] for e in page["events"]] == ["session.created"]
        assert page["events"][0]["payload"]["labels"] == {"gen": "new"}

        # the old session's tokens open nothing of the new one, on any endpoint
        async with httpx.AsyncClient(base_url=shared_service.url, timeout=10) as anon:
            for method, path, body_json in _every_endpoint(sid):
                r = await anon.request(method, path, json=body_json, headers=old)
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.headers["content-type"] == PROBLEM
                assert r.json()["type"] == "urn:eventcore:problem:unauthorized"
                if method == "GET":
                    sep = "&" if "?" in path else "?"
                    r = await anon.get(f"{path}{sep}access_token={old_read}")
                    assert r.status_code == 401, (path, r.text)
                    r = await anon.get(path, headers={"Authorization": f"Bearer {old_read}"})
                    assert r.status_code == 401, (path, r.text)
            assert await shared_log.last_seq(sid) == 1  # they wrote nothing
            # the new session's token does
            new = {"Authorization": f"Bearer {new_token}"}
            r = await anon.post(f"/v1/sessions/{sid}/inputs", headers=new,
                                json={"payload": {"text": "new"}})
            assert r.status_code == 200 and r.json()["seq"] == 2
            r = await anon.get(f"/v1/sessions/{sid}/events?format=json&after=1", headers=new)
            assert [e["payload"] for e in r.json()["events"]] == [{"text": "new"}]
        # the API key reaches both, one after the other, as ever
        r = await c.get(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200
