"""``/ui/eventcore.js`` in a real headless Chromium across a stream divergence (a failover that
lost acknowledged appends, played on one node by ``tests/divergence.py``): one ``StreamReset``
with reason ``diverged``, the right ``resumeAfter`` and ``epoch``, then the new history with no
gap and no duplicate; the iterator keeps the full id as its cursor and resumes with it after a
server restart (no second reset); a saved cursor of the old epoch is reset once, one of the new
epoch is not; JSON pages carry the epoch and the reset. The ``/ui`` viewer drops the rows the
divergence rewrote and shows the new ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pytest
from cdp import chromium, chromium_binary
from divergence import lose_tail
from live_service import serve
from sdk_page import done, follow, reached, seqs
from test_sdk_browser import DEADLINE, open_sdk
from test_ui_browser import rows, wait_for_row

from eventcore import Envelope, EventLog, load_settings
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import free_port

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="needs Debian's chromium (apt-get install chromium)")


def _readme_reader() -> str:
    """The README's browser reader of a saved cursor ("Client SDKs"), verbatim."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```js\n(.*?)```", readme, re.S)
               if 'localStorage.getItem("cursor"' in block]
    return code


def _notes(sid: str, v: str, n: int) -> list[Envelope]:
    return [Envelope(type="note", session_id=sid, payload={"v": v, "i": i}) for i in range(n)]


async def test_the_sdk_is_reset_once_and_resumes_in_the_new_epoch(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             api_key="e" * 32)  # both servers below accept the same key
    port = free_port()
    resets = "window.got.filter(i => i.control === 'reset')"
    cursor = "[window.stream.after, window.stream.epoch, window.stream.lastEventId]"
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser:
            async with serve(log, port=port) as svc:
                sid, _ = await svc.create_session()
                await log.append_many(_notes(sid, "old", 9))  # seqs 2..10
                page = await open_sdk(browser, svc)
                await page.evaluate(follow(sid, token=svc.api_key))
                await reached(page, 10)
                assert await page.evaluate(cursor) == [10, "0", "10"]
                await lose_tail(log, sid, 7)
                await log.append_many(_notes(sid, "new", 6))  # seqs 8..13 again
                await reached(page, 13)
                (reset,) = await page.evaluate(resets)
                epoch = reset["epoch"]
                assert len(epoch) == 16 and epoch.isdigit()
                assert reset == {"control": "reset", "reason": "diverged", "after": 10,
                                 "resumeAfter": 7, "epoch": epoch, "seenEpoch": "0"}
                assert await page.evaluate(cursor) == [13, epoch, f"13.{epoch}"]
            # the server is gone: the SDK resumes with `13.<epoch>` on the next one
            await page.evaluate("window.until(() => window.statuses.at(-1) === 'reconnecting')")
            await log.emit(sid, "note", {"v": "while down"})  # 14
            async with serve(log, port=port) as svc:
                await reached(page, 14)
                await log.end_session(sid)  # 15
                await done(page)
                assert await page.evaluate("window.failure") is None
                assert await seqs(page) == list(range(1, 11)) + list(range(8, 16))
                assert len(await page.evaluate(resets)) == 1  # no second reset
                got = await page.evaluate("window.got")
                assert got[10]["control"] == "reset"
                assert [e["payload"] for e in got[11:17]] == [{"v": "new", "i": i}
                                                             for i in range(6)]
                assert await page.evaluate(cursor) == [15, epoch, f"15.{epoch}"]

                # saved cursors: (10, "0") from before the failover, (12, epoch) from after
                key, sid_js = json.dumps(svc.api_key), json.dumps(sid)
                saved = await page.evaluate(f"""(async () => {{
                    const c = new window.ec.EventcoreClient({{ token: {key} }});
                    const take = async (opts) => {{
                        const it = c.events({sid_js}, opts), out = [];
                        for await (const item of it) {{
                            out.push(item instanceof window.ec.StreamReset
                                ? ['reset', item.reason, item.resumeAfter, item.epoch]
                                : item.seq);
                        }}
                        return {{ out, after: it.after, epoch: it.epoch }};
                    }};
                    const stale = await take({{ after: 10 }});
                    const fresh = await take({{ after: 12, epoch: stale.epoch }});
                    const p1 = await c.history({sid_js}, {{ after: 10 }});
                    const p2 = await c.history({sid_js}, {{ after: p1.next_after,
                                                           epoch: p1.epoch }});
                    return {{ stale, fresh, p1, p2: [p2.events.map(e => e.seq), p2.epoch,
                                                     p2.reset === undefined] }};
                }})()""")
                # the README's reader, verbatim, from a cursor saved before the failover
                readme = await page.evaluate(f"""(async () => {{
                    localStorage.setItem("cursor", JSON.stringify({{ after: 10, epoch: "0" }}));
                    const {{ EventcoreClient, StreamReset, SessionDeleted }} = window.ec;
                    const ec = new EventcoreClient({{ token: {key} }}), sessionId = {sid_js};
                    const held = new Map();
                    for (let seq = 1; seq <= 10; seq++) held.set(seq, {{ seq, v: "old" }});
                    {_readme_reader()}
                    return {{ held: Array.from(held.values()).map(e => [e.seq, e.payload]),
                              cursor: JSON.parse(localStorage.getItem("cursor")) }};
                }})()""")
            assert readme["cursor"] == {"after": 15, "epoch": epoch}
            assert [seq for seq, _ in readme["held"]] == list(range(1, 16))
            assert [p for _, p in readme["held"][7:13]] == [{"v": "new", "i": i}
                                                            for i in range(6)]
            assert saved["stale"] == {"out": [["reset", "diverged", 7, epoch],
                                              *range(8, 16)], "after": 15, "epoch": epoch}
            assert saved["fresh"] == {"out": [13, 14, 15], "after": 15, "epoch": epoch}
            p1 = saved["p1"]
            assert (p1["events"], p1["next_after"], p1["epoch"]) == ([], 7, epoch)
            assert p1["reset"]["reason"] == "diverged" and p1["reset"]["resume_after"] == 7
            assert saved["p2"] == [list(range(8, 16)), epoch, True]


async def test_the_viewer_drops_the_rows_a_divergence_rewrote(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4)
    with anyio.fail_after(DEADLINE):
        async with EventLog(settings) as log, chromium() as browser, serve(log) as svc:
            sid, token = await svc.create_session()
            await log.append_many(_notes(sid, "old", 9))  # seqs 2..10
            page = await browser.new_page()
            await page.navigate(f"{svc.url}/ui#session={sid}&token={token}")
            assert "old" in await page.evaluate(wait_for_row(10))
            await lose_tail(log, sid, 7)
            await log.append_many(_notes(sid, "new", 6))  # seqs 8..13 again
            await page.evaluate(wait_for_row(13))
            assert await rows(page) == list(range(1, 14))  # each seq once, in order
            texts = await page.evaluate("Array.from(document.querySelectorAll('#rows tr'))"
                                        ".map(r => r.textContent)")
            assert all("old" in t for t in texts[1:7])
            assert all("new" in t and "old" not in t for t in texts[7:]), texts[7:]
            assert "rewritten" in await page.evaluate(
                "document.getElementById('notice').textContent")
