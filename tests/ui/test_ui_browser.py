"""The viewer in a real headless Chromium against the real service: it authenticates, shows
history and live events in seq order, fills in custom event kinds, escapes what it shows,
sends inputs, and resumes after a server restart with no gap and no duplicate row."""

from __future__ import annotations

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


