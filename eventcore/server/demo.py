"""The demo app: ``eventcore serve eventcore.server.demo:app`` (or ``eventcore worker ...``).

Agent ``echo``: for every input whose payload is ``{"text": T}`` it opens a run, makes one
memoized tool call (``shout``: T upper-cased), emits a ``signal`` with key ``status``, emits a
``message`` envelope whose payload is ``{"text": T}``, and completes the run. The input
``{"text": "bye"}`` ends the session after its answer.
"""

from __future__ import annotations

from typing import Any

from eventcore.workers import App, Session

__all__ = ["app"]

app = App()


async def _shout(args: dict[str, Any]) -> str:
    return str(args.get("text", "")).upper()


@app.agent("echo")
async def echo(session: Session) -> None:
    async for msg in session.inputs():
        payload = msg.payload if isinstance(msg.payload, dict) else {"text": msg.payload}
        text = str(payload.get("text", ""))
        async with session.run("reply") as run:
            loud = await run.tool("shout", {"text": text}, _shout)
            await session.signal("status", {"state": "answered", "shouted": loud})
            await run.emit("message", {"text": text})
        if text.strip().lower() == "bye":
            return
