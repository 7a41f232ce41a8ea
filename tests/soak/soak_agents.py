"""The agent of the soak: hosted by ``eventcore worker soak_agents:app`` and named by
``eventcore serve soak_agents:app`` (both run with this directory as the working directory).

Each input ``{"text": T, "last": bool}`` is answered with one run: a memoized tool call, a
``status`` signal and a ``message`` whose payload names the input's seq (``answer``), so a
follower can tell that every input was answered. An input with ``last`` ends the session.
"""

from __future__ import annotations

from typing import Any

from eventcore.workers import App, Session

app = App()


async def _measure(args: dict[str, Any]) -> int:
    return len(str(args["text"]))


@app.agent("soak")
async def soak(session: Session) -> None:
    async for msg in session.inputs():
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        async with session.run("answer") as run:
            size = await run.tool("measure", {"text": payload.get("text", "")}, _measure)
            await session.signal("status", "answered")
            await run.emit("message", {"answer": msg.seq, "size": size})
        if payload.get("last"):
            return
