"""Helpers for driving ``/ui/eventcore.js`` in a page of the service's origin."""

from __future__ import annotations

import json
from typing import Any

from cdp import Page

# window.ec: the module; window.got: items collected by window.follow(); window.statuses
LOAD = """(async () => {
    window.ec = await import('/ui/eventcore.js');
    window.got = []; window.statuses = []; window.ended = false; window.failure = null;
    window.waiters = [];
    window.wake = () => { for (const w of window.waiters.splice(0)) w(); };
    window.until = (pred) => new Promise((resolve) => {
        const check = () => { if (pred()) resolve(true); else window.waiters.push(check); };
        check();
    });
    return Object.keys(window.ec).sort();
})()"""


def follow(sid: str, *, token: str, refresh: str = "null", after: int = 0,
           options: dict[str, Any] | None = None) -> str:
    """JS: start ``events()`` of ``sid`` into ``window.got`` (envelopes as-is, control items as
    ``{control: type, ...}``; the iterator is ``window.stream``); ``refresh`` is a JS expression
    for ``refreshToken``."""
    opts = json.dumps({"backoffMaxMs": 500, **(options or {})})
    return f"""(() => {{
        window.client = new window.ec.EventcoreClient(Object.assign({opts},
            {{ token: {json.dumps(token)}, refreshToken: {refresh} }}));
        window.stream = window.client.events({json.dumps(sid)}, {{ after: {after},
            onStatus: (s) => {{ window.statuses.push(s); window.wake(); }} }});
        (async () => {{
            try {{
                for await (const item of window.stream) {{
                    const ec = window.ec;
                    if (item instanceof ec.StreamReset) {{
                        window.got.push({{ control: 'reset', after: item.after,
                                           resumeAfter: item.resumeAfter, reason: item.reason,
                                           epoch: item.epoch, seenEpoch: item.seenEpoch }});
                    }} else if (item instanceof ec.SessionDeleted) {{
                        window.got.push({{ control: 'deleted', sid: item.sessionId,
                                           last: item.lastSeq }});
                    }} else window.got.push(item);
                    window.wake();
                }}
            }} catch (e) {{ window.failure = {{ message: String(e.message), status: e.status }}; }}
            window.ended = true; window.wake();
        }})();
        return true;
    }})()"""


async def seqs(page: Page) -> list[int]:
    got: list[int] = await page.evaluate("window.got.filter(i => !i.control).map(i => i.seq)")
    return got


async def reached(page: Page, seq: int) -> None:
    await page.evaluate(f"window.until(() => window.got.some(i => i.seq >= {seq}))")


async def done(page: Page) -> None:
    await page.evaluate("window.until(() => window.ended)")
