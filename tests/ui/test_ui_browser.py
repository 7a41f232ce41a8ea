"""The viewer in a real headless Chromium against the real service: it authenticates, shows
history and live events in seq order, fills in custom event kinds, escapes what it shows,
sends inputs, and resumes after a server restart with no gap and no duplicate row."""

from __future__ import annotations

import base64
import json
from typing import Any

import anyio
import pytest
from cdp import Page, chromium, chromium_binary
from live_service import serve

from eventcore import EventLog, load_settings
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import free_port

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="needs Debian's chromium (apt-get install chromium)")

DEADLINE = 90


def wait_for_row(seq: int) -> str:
    """JS: a promise resolving once the row of ``seq`` is in the table (a MutationObserver,
    not a poll)."""
    return f"""new Promise((resolve) => {{
        const sel = 'tr[data-seq="{seq}"]';
        const done = () => {{ const el = document.querySelector(sel);
                              if (el) {{ resolve(el.textContent); return true; }} return false; }};
        if (done()) return;
        const obs = new MutationObserver(() => {{ if (done()) obs.disconnect(); }});
        obs.observe(document.body, {{ childList: true, subtree: true }});
    }})"""


ROW_SEQS = "Array.from(document.querySelectorAll('#rows tr')).map(r => Number(r.dataset.seq))"


async def rows(page: Page) -> list[int]:
    got: list[int] = await page.evaluate(ROW_SEQS)
    return got


async def test_the_viewer_follows_a_session_in_a_real_browser(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             api_key="u" * 32)  # both servers below accept the same tokens
    port = free_port()
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser:
            async with serve(log, port=port) as svc:
                sid, token = await svc.create_session()
                await log.emit(sid, "message", {"text": "<img src=x onerror=alert(1)>"})
                page = await browser.new_page()
                await page.navigate(f"{svc.url}/ui#session={sid}&token={token}")
                assert "onerror" in await page.evaluate(wait_for_row(2))
                # shown as text, never as markup
                assert await page.evaluate("document.querySelectorAll('#rows img').length") == 0
                # the credential left the address bar once read
                assert await page.evaluate("location.hash") == f"#session={sid}"

                await log.signal(sid, "status", "thinking")           # 3, live
                await log.emit(sid, "custom.kind", {"x": 1})          # 4, no listener: filled in
                await log.emit(sid, "message", {"text": "after custom"})  # 5
                await page.evaluate(wait_for_row(5))
                assert await rows(page) == [1, 2, 3, 4, 5]
                assert "thinking" in await page.evaluate(
                    "document.getElementById('signals').textContent")

                # an input typed into the page lands in the log
                await page.evaluate("""(() => { document.getElementById('f-text').value = 'typed';
                    document.getElementById('input-form').requestSubmit(); })()""")
                await page.evaluate(wait_for_row(6))
                (typed,) = await log.read(sid, after=5)
                assert typed.type == "input" and typed.payload == {"text": "typed"}
                assert typed.event_key.startswith("input:")  # sent with an idempotency key

            # the server is gone; events keep coming
            await log.emit(sid, "message", {"text": "while down"})    # 7
            await page.evaluate("""new Promise((resolve) => {
                const s = document.getElementById('status');
                if (s.textContent === 'reconnecting') return resolve(true);
                new MutationObserver((_, o) => { if (s.textContent === 'reconnecting') {
                    o.disconnect(); resolve(true); } }).observe(s, { childList: true,
                    characterData: true, subtree: true });
            })""")
            async with serve(log, port=port):
                await log.end_session(sid)                            # 8
                await page.evaluate(wait_for_row(8))
                assert await rows(page) == list(range(1, 9))       # no gap, no duplicate
                assert await page.evaluate("document.getElementById('status').textContent") \
                    == "ended"
                assert await page.evaluate("document.getElementById('state').textContent") \
                    == "ended"
    assert not [c for c in browser.console if "Content Security Policy" in c], browser.console





TOKEN_TTL_S = 2  # what the viewer's read-token requests are rewritten to (it asks for 300)
CONTROL = {"token.expired", "server.shutdown", "stream.reset"}  # SSE events that are no envelope
# every text the status badge shows from now on, into window.statusLog
STATUS_LOG = """(() => { window.statusLog = [];
    new MutationObserver((recs) => { for (const r of recs) for (const n of r.addedNodes)
        window.statusLog.push(n.textContent); })
      .observe(document.getElementById('status'), { childList: true }); })()"""


def _post_data(request: dict[str, Any]) -> bytes:
    if "postData" in request:
        return str(request["postData"]).encode()
    return b"".join(base64.b64decode(e.get("bytes", "")) for e in request["postDataEntries"])


async def test_the_viewer_renews_its_read_token_at_expiry_with_no_gap(redis_url: str) -> None:
    """Every read token the viewer mints lives 2 s: each stream ends with ``token.expired``,
    and the viewer mints a fresh token and resumes after ``resume_after`` right away, never
    through a 401 and a backoff. An event appended while it waits for the new token (the
    token request is held in the browser) reaches it as catch-up on the new stream."""
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    renewed = [anyio.Event(), anyio.Event()]
    ended_on_wire = anyio.Event()  # DevTools events of other domains may come after the DOM's
    responses: list[dict[str, Any]] = []   # Network.responseReceived
    frames: list[dict[str, Any]] = []      # Network.eventSourceMessageReceived
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, serve(log) as svc:
            sid, token = await svc.create_session()
            page = await browser.new_page()

            async def shorten_tokens(paused: Any) -> None:
                minted = 0
                async for req in paused:
                    body = json.loads(_post_data(req["request"]))
                    assert body["scope"] == "read", body
                    body["ttl_s"] = TOKEN_TTL_S
                    renewal = minted - 1  # the first token opens the first stream
                    minted += 1
                    if 0 <= renewal < len(renewed):
                        # the expired stream has ended, the next one is not open yet
                        await log.emit(sid, "message", {"text": f"during renewal {renewal}"})
                    await page.send("Fetch.continueRequest", {
                        "requestId": req["requestId"],
                        "postData": base64.b64encode(json.dumps(body).encode()).decode()})
                    if 0 <= renewal < len(renewed):
                        renewed[renewal].set()

            async def record(events: Any, into: list[dict[str, Any]]) -> None:
                async for ev in events:
                    into.append(ev)
                    if ev.get("eventName") == "session.ended":
                        ended_on_wire.set()

            async with page.intercept("*/tokens") as paused, \
                    page.subscribe("Network.responseReceived") as resp_events, \
                    page.subscribe("Network.eventSourceMessageReceived") as es_events, \
                    anyio.create_task_group() as tg:
                await page.send("Network.enable")
                tg.start_soon(record, resp_events, responses)
                tg.start_soon(record, es_events, frames)
                tg.start_soon(shorten_tokens, paused)
                await page.navigate(f"{svc.url}/ui#session={sid}&token={token}")
                await page.evaluate(wait_for_row(1))
                await page.evaluate(STATUS_LOG)
                await log.emit(sid, "message", {"text": "before the first expiry"})  # 2
                await page.evaluate(wait_for_row(2))
                await renewed[0].wait()                                              # 3
                await log.emit(sid, "message", {"text": "after the first renewal"})  # 4
                await page.evaluate(wait_for_row(4))
                await renewed[1].wait()                                              # 5
                await log.end_session(sid)                                           # 6
                await page.evaluate(wait_for_row(6))
                await ended_on_wire.wait()
                tg.cancel_scope.cancel()

            assert await rows(page) == list(range(1, 7))  # no gap, no duplicate row
            assert await page.evaluate("document.getElementById('status').textContent") \
                == "ended"
            # renewed at once: no stream was refused, the viewer never backed off
            streams = [r["response"]["status"] for r in responses if r["type"] == "EventSource"]
            assert len(streams) >= 3, streams
            assert set(streams) == {200}, streams
            log_ = await page.evaluate("window.statusLog")
            assert "reconnecting" not in log_, log_
            # and resumed exactly where the expired stream stopped: each envelope sent once
            sent = [int(f["eventId"]) for f in frames if f["eventName"] not in CONTROL]
            assert sorted(sent) == list(range(1, 7)), frames
            assert sum(f["eventName"] == "token.expired" for f in frames) >= 2, frames


def wait_for_status(text: str) -> str:
    """JS: a promise resolving once the status badge says ``text``."""
    return f"""new Promise((resolve) => {{
        const s = document.getElementById('status');
        if (s.textContent === {json.dumps(text)}) return resolve(true);
        new MutationObserver((_, o) => {{ if (s.textContent === {json.dumps(text)}) {{
            o.disconnect(); resolve(true); }} }}).observe(s, {{ childList: true,
            characterData: true, subtree: true }});
    }})"""


async def test_the_viewer_stops_at_session_deleted(redis_url: str) -> None:
    """The session's keys vanish under a live stream (with no session.ended, as when they
    expire or are removed) and the id is created again: the stream ends with
    ``session.deleted`` and the viewer stops there, showing nothing of the new session. Before,
    it took the end of the response for a drop, reconnected, minted a read token for whatever
    the id named by then, and showed the new session's events."""
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, \
                serve(log, hub_options={"resync_s": 0.5}) as svc:
            sid, _ = await svc.create_session()
            await log.emit(sid, "message", {"text": "old"})                          # 2
            page = await browser.new_page()
            await page.navigate(f"{svc.url}/ui#session={sid}&token={svc.api_key}")
            await page.evaluate(wait_for_row(2))
            await log.redis.delete(*log.keys.session(sid).per_session)
            await log.create_session("echo", session_id=sid)
            for i in range(4):  # the new session's seqs pass the viewer's
                await log.emit(sid, "message", {"text": f"new {i}"})
            with anyio.fail_after(20):
                await page.evaluate(wait_for_status("deleted"))
            assert await rows(page) == [1, 2]
            assert "new" not in await page.evaluate("document.getElementById('rows').textContent")
