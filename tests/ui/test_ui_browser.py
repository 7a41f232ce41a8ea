"""The viewer in a real headless Chromium against the real service: it authenticates, shows
history and live events in seq order (custom event kinds included), escapes what it shows,
sends inputs, resumes after a server restart with no gap and no duplicate row, stops at
``session.deleted``, lists sessions live, builds the run tree (runs, tool calls, effects) from
a real worker's events, filters by type and cancels runs."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from cdp import Page, chromium, chromium_binary
from live_service import serve

from eventcore import EventLog, load_settings
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import free_port
from eventcore.workers import App, Session, Worker

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
                await log.emit(sid, "custom.kind", {"x": 1})          # 4, a custom kind, live too
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


def wait_for(selector: str) -> str:
    """JS: a promise resolving with the text of the first element matching ``selector`` once
    there is one (a MutationObserver, attributes included)."""
    return f"""new Promise((resolve) => {{
        const sel = {json.dumps(selector)};
        const done = () => {{ const el = document.querySelector(sel);
                              if (el) {{ resolve(el.textContent); return true; }} return false; }};
        if (done()) return;
        const obs = new MutationObserver(() => {{ if (done()) obs.disconnect(); }});
        obs.observe(document.body, {{ childList: true, subtree: true, attributes: true,
                                      characterData: true }});
    }})"""


async def _shout(args: dict[str, Any]) -> str:
    return str(args["text"]).upper()


def tree_agents() -> App:
    agents = App()

    @agents.agent("tree")
    async def tree(session: Session) -> None:
        """Per input: ``ok`` a run with one tool call; ``fail`` a run whose tool succeeds and
        that then fails; ``slow`` a run that waits to be cancelled."""
        async for msg in session.inputs():
            text = msg.payload["text"]
            try:
                async with session.run(text) as run:
                    if text == "slow":
                        await anyio.sleep(60)
                    await run.tool("shout", {"text": text}, _shout)
                    if text == "fail":
                        raise ValueError("boom <b>not markup</b>")
                    await run.emit("message", {"text": text})
            except ValueError:
                pass

    return agents


async def test_the_run_tree_filter_and_cancel(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, serve(log) as svc, \
                Worker(tree_agents(), log, block_ms=100):
            info = await log.create_session("tree")
            sid = info.session_id
            page = await browser.new_page()
            await page.navigate(f"{svc.url}/ui#session={sid}&token={svc.api_key}")
            await page.evaluate(wait_for_row(1))

            async def send(text: str) -> None:
                await page.evaluate(f"""(() => {{
                    document.getElementById('f-text').value = {json.dumps(text)};
                    document.getElementById('input-form').requestSubmit(); }})()""")

            await send("ok")
            await page.evaluate(wait_for('#runs > li.run[data-state="completed"]'))
            run_text = await page.evaluate(
                "document.querySelector('#runs > li.run[data-state=\"completed\"]').textContent")
            assert "ok" in run_text and " ms" in run_text
            tool = await page.evaluate("""(() => {
                const t = document.querySelector('#runs > li.run > ul > li.tool');
                return { state: t.dataset.state, text: t.textContent,
                         effects: Array.from(t.querySelectorAll('li.effect'))
                                  .map(e => e.dataset.state) }; })()""")
            assert tool["state"] == "ok" and "shout" in tool["text"]
            assert tool["effects"] == ["ok"]  # the tool's memoized result, under the call

            await send("fail")
            err = await page.evaluate(wait_for('#runs > li.run[data-state="failed"] .err'))
            assert err == "ValueError: boom <b>not markup</b>"
            assert await page.evaluate("document.querySelectorAll('#runs b').length") == 0

            await send("slow")
            await page.evaluate(wait_for('#runs > li.run[data-state="running"] .run-cancel'))
            await page.evaluate("document.querySelector("
                                "'#runs > li.run[data-state=\"running\"] .run-cancel').click()")
            await page.evaluate(wait_for('#runs > li.run[data-state="cancelled"]'))
            cancels = [e for e in await log.read(sid) if e.type == "control.cancel"]
            assert len(cancels) == 1 and cancels[0].payload["run_id"]
            assert await page.evaluate(
                "document.querySelectorAll('#runs > li.run').length") == 3
            assert await page.evaluate(
                "Array.from(document.querySelectorAll('#inputs li')).map(l => l.textContent)"
                ".map(t => t.split(' ').slice(1).join(' '))") == [
                '{"text":"ok"}', '{"text":"fail"}', '{"text":"slow"}']

            # filter by type: only tool.ended rows stay visible
            await page.evaluate("""(() => { const s = document.getElementById('f-type');
                s.value = 'tool.ended'; s.dispatchEvent(new Event('change')); })()""")
            shown = await page.evaluate("""Array.from(document.querySelectorAll('#rows tr'))
                .filter(r => !r.hidden).map(r => r.dataset.type)""")
            assert shown == ["tool.ended", "tool.ended"]
            assert await page.evaluate("document.getElementById('shown').textContent") == "2"
            await page.evaluate("""(() => { const s = document.getElementById('f-type');
                s.value = ''; s.dispatchEvent(new Event('change')); })()""")
            all_rows = await rows(page)
            assert all_rows == list(range(1, len(all_rows) + 1))

            # the header's cancel: the session's current work
            n = len(await log.read(sid))
            await page.evaluate("document.getElementById('cancel').click()")
            await page.evaluate(wait_for(f'tr[data-seq="{n + 1}"][data-type="control.cancel"]'))
    assert not [c for c in browser.console if "Content Security Policy" in c], browser.console


async def test_the_session_list_is_live_and_opens_a_session(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    created: list[str] = []
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, serve(log) as svc:
            page = await browser.new_page()
            first, _ = await svc.create_session()
            created.append(first)
            await page.navigate(f"{svc.url}/healthz")  # then a fresh boot of the page
            await page.navigate(f"{svc.url}/ui#token={svc.api_key}")
            await page.evaluate(wait_for(f'#session-rows tr[data-sid="{first}"]'))
            assert await page.evaluate("location.hash") in ("", "#")  # the key left the URL
            # live: a session created now appears without a reload
            info = await log.create_session("tree", labels={"team": "ui"})
            created.append(info.session_id)
            row = await page.evaluate(wait_for(f'#session-rows tr[data-sid="{info.session_id}"]'))
            assert "tree" in row and '{"team":"ui"}' in row
            await page.evaluate(f"""document.querySelector(
                '#session-rows tr[data-sid="{info.session_id}"]').click()""")
            await page.evaluate(wait_for_row(1))
            assert await page.evaluate("document.getElementById('sid').textContent") \
                == info.session_id
            assert await page.evaluate("location.hash") == f"#session={info.session_id}"
            # and back to the list
            await page.evaluate("document.getElementById('to-list').click()")
            await page.evaluate(wait_for(f'#session-rows tr[data-sid="{first}"]'))


async def test_a_failed_runs_traceback_is_shown_to_admins_only(redis_url: str) -> None:
    """``server_data`` (where the worker keeps a failed run's traceback) never goes to clients:
    the viewer asks its own endpoint for it, which answers the API key only."""
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    trace = "Traceback (most recent call last):\n  File \"agent.py\", line 3\nValueError: <i>x"
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, serve(log) as svc:
            sid, token = await svc.create_session()
            await log.emit(sid, "run.started", {"name": "step"}, run_id="r1")
            failed = await log.emit(sid, "run.failed", {
                "name": "step", "duration_ms": 12.5,
                "error": {"type": "ValueError", "message": "<i>x", "retryable": True}},
                run_id="r1", server_data={"traceback": trace})
            page = await browser.new_page()
            await page.navigate(f"{svc.url}/ui#session={sid}&token={svc.api_key}")
            shown = await page.evaluate(wait_for('#runs li.run[data-run="r1"] pre.traceback'))
            assert shown == trace
            assert await page.evaluate(
                "document.querySelector('#runs li.run[data-run=\"r1\"] .dur').textContent") \
                == "13 ms"
            assert await page.evaluate("document.querySelectorAll('#runs i').length") == 0
            # the envelopes themselves never carry it
            assert "Traceback" not in await page.evaluate(
                "document.getElementById('rows').textContent")
            async with svc.client(token) as c:
                r = await c.get(f"/ui/api/sessions/{sid}/failures")
                assert r.status_code == 403
                assert r.headers["content-type"].startswith("application/problem+json")
            async with svc.client(svc.api_key) as c:
                r = await c.get(f"/ui/api/sessions/{sid}/failures")
                assert r.json() == {"failures": [{"seq": failed.seq, "type": "run.failed",
                                                  "run_id": "r1",
                                                  "server_data": {"traceback": trace}}]}
                assert (await c.get("/ui/api/sessions/nope/failures")).status_code == 404
