"""Agents hosted by the worker benchmarks' worker processes (``eventcore worker
_worker_agents:app`` run in this directory)."""

from __future__ import annotations

import os
import time

import anyio

from eventcore.workers import App, Session

app = App()


@app.agent("first")
async def first(session: Session) -> None:
    """Dispatch throughput: record one event and end."""
    await session.emit("message", {"hello": session.id})


@app.agent("idle")
async def idle(session: Session) -> None:
    """Density: answer each input, then wait (idle-ish, as a chat session between turns)."""
    async for msg in session.inputs():
        async with session.run("reply") as run:
            await run.emit("message", {"echo": msg.payload})


@app.agent("hold")
async def hold(session: Session) -> None:
    """Recovery: reply, then hold the run (BENCH_HOLD_S), then report which process finished."""
    wait = float(os.environ.get("BENCH_HOLD_S", "0"))
    async for msg in session.inputs():
        async with session.run("reply") as run:
            await run.emit("message", {"echo": msg.payload})
            await anyio.sleep(wait)
            await run.emit("progress", {"pid": os.getpid()})


@app.agent("hog")
async def hog(session: Session) -> None:
    """Blocks the event loop with CPU work for ``hog_s`` (a label) per input."""
    async for _ in session.inputs():
        async with session.run("hog") as run:
            end = time.monotonic() + float(session.labels.get("hog_s", "1"))
            while time.monotonic() < end:
                pass
            await run.emit("message", {"done": True})
