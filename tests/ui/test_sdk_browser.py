"""``/ui/eventcore.js`` in a real headless Chromium against the real service: every event type
(custom ones included) in seq order, typed errors, idempotent inputs, the token-refresh hook at
a stream token's expiry and on 401, ``session.deleted``, and resume across a server restart
mid-stream with no gap and no duplicate."""

from __future__ import annotations

import json

import anyio
import pytest
from cdp import Page, chromium, chromium_binary
from live_service import Service, serve
from sdk_page import LOAD, done, follow, reached, seqs

from eventcore import EventLog, load_settings
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import free_port

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="needs Debian's chromium (apt-get install chromium)")

DEADLINE = 90


async def open_sdk(browser: object, svc: Service) -> Page:
    page: Page = await browser.new_page()  # type: ignore[attr-defined]
    await page.navigate(f"{svc.url}/healthz")  # any page of the service's origin
    exported = await page.evaluate(LOAD)
    assert {"EventcoreClient", "EventcoreError", "SessionDeleted", "StreamReset"} <= set(exported)
    return page


async def test_the_sdk_is_served_as_a_module_any_origin_may_import(service: Service) -> None:
    async with service.client() as c:
        r = await c.get("/ui/eventcore.js", headers={"Origin": "https://app.example.com"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "export class EventcoreClient" in r.text
    assert "import " not in r.text.replace("import {", "")  # no dependency
    assert "new EventSource(" not in r.text  # fetch: every named event, headers, no URL token


async def test_every_event_type_in_order_and_the_calls(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    types = ["message", "log", "custom.kind", "tool.started", "tool.ended", "run.started",
             "my-app/thing", "effect.like"]
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, serve(log) as svc:
            page = await open_sdk(browser, svc)
            key = json.dumps(svc.api_key)
            made = await page.evaluate(f"""(async () => {{
                const c = new window.ec.EventcoreClient({{ token: {key} }});
                const s = await c.createSession('echo', {{ metadata: {{ team: 'js' }} }});
                const once = {{ idempotencyKey: 'k' }};
                const a = await c.sendInput(s.session_id, {{ text: 'hi' }}, once);
                const b = await c.sendInput(s.session_id, {{ text: 'again' }}, once);
                const sig = await c.sendSignal(s.session_id, 'status', 'thinking');
                const st = await c.getSession(s.session_id);
                const tok = await c.getToken(s.session_id, {{ scope: 'read', ttlS: 30 }});
                const page = await c.history(s.session_id);
                let missing = null;
                try {{ await c.getSession('nope-' + s.session_id); }}
                catch (e) {{
                    missing = [e instanceof window.ec.EventcoreError, e.status, e.problem];
                }}
                let forbidden = null;
                const reader = new window.ec.EventcoreClient({{ token: tok.token }});
                try {{ await reader.sendInput(s.session_id, 1); }}
                catch (e) {{ forbidden = e.status; }}
                return {{ sid: s.session_id, a, b, sig, labels: st.labels, scope: tok.scope,
                          types: page.events.map(e => e.type), missing, forbidden }};
            }})()""")
            sid = made["sid"]
            assert made["a"] == {"seq": 2, "duplicate": False}
            assert made["b"] == {"seq": 2, "duplicate": True}
            assert made["sig"]["seq"] == 3 and made["labels"] == {"team": "js"}
            assert made["scope"] == "read"
            assert made["types"] == ["session.created", "input", "signal"]
            assert made["missing"] == [True, 404, "session-not-found"]
            assert made["forbidden"] == 403
            (inp,) = [e for e in await log.read(sid) if e.type == "input"]
            assert inp.event_key == "input:k"

            await page.evaluate(follow(sid, token=svc.api_key))
            for t in types:
                await log.emit(sid, t, {"t": t})
            await log.end_session(sid)
            await done(page)
            assert await page.evaluate("window.failure") is None
            got = await page.evaluate("window.got.map(e => e.type)")
            assert got == ["session.created", "input", "signal", *types, "session.ended"]
            assert await seqs(page) == list(range(1, len(got) + 1))
            assert await page.evaluate("window.statuses.at(-1)") == "ended"


async def test_the_sdk_resumes_across_a_server_restart_with_no_gap(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             api_key="s" * 32)  # both servers below accept the same tokens
    port = free_port()
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser:
            async with serve(log, port=port) as svc:
                sid, token = await svc.create_session()
                page = await open_sdk(browser, svc)
                await page.evaluate(follow(sid, token=token))  # a session token this time
                for i in range(3):
                    await log.emit(sid, "message", {"i": i})
                await reached(page, 4)
            # the server is gone; events keep coming, of several types
            await page.evaluate("window.until(() => window.statuses.at(-1) === 'reconnecting')")
            await log.emit(sid, "message", {"text": "while down"})         # 5
            await log.emit(sid, "custom.down", {"x": 1})                    # 6
            await log.signal(sid, "status", "down")                         # 7
            async with serve(log, port=port):
                await log.emit(sid, "log", {"text": "back"})                # 8
                await reached(page, 8)
                await log.end_session(sid)                                  # 9
                await done(page)
            assert await page.evaluate("window.failure") is None
            assert await seqs(page) == list(range(1, 10))  # no gap, no duplicate
            assert await page.evaluate("window.got.map(e => e.type).slice(4)") == [
                "message", "custom.down", "signal", "log", "session.ended"]
            statuses = await page.evaluate("window.statuses")
            assert statuses.count("live") >= 2 and "reconnecting" in statuses


async def test_the_refresh_hook_renews_expiring_tokens(redis_url: str) -> None:
    """A stream opened with a session token ends at its expiry with ``token.expired``: the SDK
    asks ``refreshToken`` and resumes after the last seq at once; a ``401`` on a call is
    answered by one refresh and a repeat."""
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, serve(log) as svc:
            sid, _ = await svc.create_session()
            async with svc.client(svc.api_key) as c:
                r = await c.post(f"/v1/sessions/{sid}/tokens", json={"scope": "rw", "ttl_s": 1})
                short = r.json()["token"]
            page = await open_sdk(browser, svc)
            key = json.dumps(svc.api_key)
            await page.evaluate("window.minted = 0")
            refresh = f"""async () => {{
                window.minted += 1;
                const admin = new window.ec.EventcoreClient({{ token: {key} }});
                return (await admin.getToken({json.dumps(sid)}, {{ scope: 'rw', ttlS: 2 }})).token;
            }}"""
            await page.evaluate(follow(sid, token=short, refresh=refresh))
            n = 1
            while await page.evaluate("window.minted") < 3:
                n = (await log.emit(sid, "message", {"n": n})).seq
                await reached(page, n)
                await anyio.sleep(0.3)  # let time pass toward the token's expiry
            # a call with an expired token: 401, one refresh, repeated
            late = await page.evaluate(f"""(async () => {{
                window.client.token = {json.dumps(short)};
                return (await window.client.sendInput({json.dumps(sid)}, {{ text: 'late' }})).seq;
            }})()""")
            await log.end_session(sid)
            await done(page)
            assert await page.evaluate("window.failure") is None
            assert await seqs(page) == list(range(1, late + 2))  # no gap, no duplicate
            assert await page.evaluate("window.minted") >= 4


async def test_a_deleted_session_ends_with_session_deleted(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, \
                serve(log, hub_options={"resync_s": 0.5}) as svc:
            sid, _ = await svc.create_session()
            await log.emit(sid, "message", {"text": "old"})
            page = await open_sdk(browser, svc)
            await page.evaluate(follow(sid, token=svc.api_key))
            await reached(page, 2)
            await log.redis.delete(*log.keys.session(sid).per_session)
            await log.create_session("echo", session_id=sid)
            for i in range(4):
                await log.emit(sid, "message", {"text": f"new {i}"})
            await done(page)
            assert await seqs(page) == [1, 2]
            assert await page.evaluate("window.got.at(-1)") == {"control": "deleted",
                                                                "sid": sid, "last": 2}


async def test_a_page_on_another_origin_imports_the_sdk_and_follows(redis_url: str) -> None:
    """The page is on ``http://localhost:P``, the service ``http://127.0.0.1:P`` (two origins
    to the browser): the module loads (it is public to every origin) and, with the page's
    origin in ``EVENTCORE_CORS_ORIGINS``, its calls and the stream (Authorization and
    Last-Event-ID headers: a preflight) work."""
    port = free_port()
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             cors_origins=f"http://localhost:{port}")
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, \
                serve(log, port=port) as svc:
            sid, token = await svc.create_session()
            await log.emit(sid, "custom.kind", {"x": 1})
            page: Page = await browser.new_page()
            await page.navigate(f"http://localhost:{port}/healthz")
            assert await page.evaluate("location.origin") == f"http://localhost:{port}"
            await page.evaluate(LOAD.replace("'/ui/eventcore.js'",
                                             json.dumps(f"{svc.url}/ui/eventcore.js")))
            await page.evaluate(follow(sid, token=token, options={"baseUrl": svc.url}))
            await reached(page, 2)
            seq = await page.evaluate(f"""(async () => (await window.client.sendInput(
                {json.dumps(sid)}, {{ text: 'cross-origin' }})).seq)()""")
            assert seq == 3
            await log.end_session(sid)
            await done(page)
            assert await page.evaluate("window.failure") is None
            assert await page.evaluate("window.got.map(e => e.type)") == [
                "session.created", "custom.kind", "input", "session.ended"]
