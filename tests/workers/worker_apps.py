"""Agents used by the worker tests, in-process and in real worker processes
(``eventcore worker worker_apps:app`` with this directory as the working directory).

Knobs come from the environment (for worker processes) or from session labels:

``EC_TEST_EFFECTS``   a file each tool execution appends ``<session> <input seq>`` to: side
                      effects counted outside Redis
``EC_TEST_HOLD_S``    how long ``echo`` holds inside its run after replying (a "long" run);
                      then it emits ``progress`` with its pid
``EC_TEST_TOOL_HOLD_S`` how long ``echo``'s tool holds after its effect line (a process killed
                      then dies mid-tool, holding the effect's claim)
``EC_TEST_GATE``      a file ``gate`` appends ``enter|exit <pid> <session>`` lines to
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from eventcore.errors import TerminalError
from eventcore.workers import App, RetryPolicy, Session

app = App()

#: in-process observation of the ``held`` agent (tests reset it)
state: dict[str, Any] = {"current": 0, "peak": 0}


def _append_line(env: str, line: str) -> None:
    path = os.environ.get(env)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


async def upper(args: dict[str, Any]) -> str:
    _append_line("EC_TEST_EFFECTS", f"{args['sid']} {args['seq']}")
    await anyio.sleep(float(os.environ.get("EC_TEST_TOOL_HOLD_S", "0")))
    return str(args["t"]).upper()


@app.agent("echo")
async def echo(session: Session) -> None:
    hold = float(os.environ.get("EC_TEST_HOLD_S", "0"))
    async for msg in session.inputs():
        async with session.run("reply") as run:
            out = await run.tool("upper", {"t": msg.payload, "sid": session.id,
                                           "seq": msg.seq}, upper)
            await session.signal("status", "typing")
            await run.emit("message", {"text": out})
            if hold:
                await anyio.sleep(hold)
            # keyed by process on purpose: a stale host's write is a *new* event, so fencing
            # (not deduplication) is what keeps it out of the log
            await run.emit("progress", {"pid": os.getpid()},
                           key=f"{run.id}/progress:{os.getpid()}")


@app.agent("once")
async def once(session: Session) -> None:
    await session.emit("message", {"text": "hello", "attempt": session.attempt})


@app.agent("held")
async def held(session: Session) -> None:
    """Counts concurrently running handlers; each ends on its first input."""
    state["current"] += 1
    state["peak"] = max(state["peak"], state["current"])
    try:
        async for _ in session.inputs():
            return
    finally:
        state["current"] -= 1


@app.agent("gate")
async def gate(session: Session) -> None:
    """Like ``held`` across processes: enter/exit lines in ``EC_TEST_GATE``."""
    _append_line("EC_TEST_GATE", f"enter {os.getpid()} {session.id}")
    try:
        await anyio.sleep(float(session.labels.get("hold", "0.05")))
        await session.emit("message", {"pid": os.getpid()})
    finally:
        _append_line("EC_TEST_GATE", f"exit {os.getpid()} {session.id}")


@app.agent("flaky", retry=RetryPolicy(max_attempts=3, backoff_s=0.01, max_backoff_s=0.05))
async def flaky(session: Session) -> None:
    """Fails its run until attempt ``fail_until`` (a label), then replies."""
    fail_until = int(session.labels.get("fail_until", "0"))
    async for msg in session.inputs():
        async with session.run("work") as run:
            if session.attempt < fail_until:
                raise ValueError(f"attempt {session.attempt} failed")
            await run.emit("message", {"text": msg.payload, "attempt": session.attempt})
        return


@app.agent("terminal")
async def terminal(session: Session) -> None:
    async with session.run("work"):
        raise TerminalError("this input can never work")


@app.agent("slow", retry=RetryPolicy(max_attempts=2, backoff_s=0.01, max_backoff_s=0.01))
async def slow(session: Session) -> None:
    async with session.run("slow", timeout_s=float(session.labels.get("run_timeout", "0.2"))):
        await anyio.sleep(3600)


@app.agent("waiter")
async def waiter(session: Session) -> None:
    """Each input starts a run that waits until cancelled; then says how the run ended."""
    async for msg in session.inputs():
        async with session.run("long") as run:
            await run.emit("message", {"started": msg.payload})
            await anyio.sleep(3600)
        await session.emit("message", {"after": msg.payload, "cancelled": run.cancelled})


@app.agent("hog")
async def hog(session: Session) -> None:
    """Blocks the event loop with CPU work (``hog_s`` label) on each input."""
    async for msg in session.inputs():
        async with session.run("hog") as run:
            end = time.monotonic() + float(session.labels.get("hog_s", "1"))
            n = 0
            while time.monotonic() < end:  # pure Python: holds the loop, not the GIL for long
                n += 1
            await run.emit("message", {"input": msg.payload, "spins": n > 0})


@app.agent("crasher")
async def crasher(session: Session) -> None:
    """Takes its whole worker process down (as a segfault or the OOM killer would)."""
    await session.emit("message", {"pid": os.getpid()})
    os._exit(3)


@app.agent("tally")
async def tally(session: Session) -> None:
    """Sums integer inputs, checkpointing after each; logs ``<pid> <session> <seq>`` to
    ``EC_TEST_EFFECTS`` for every input it is given (re-hosting included)."""
    state = session.restored or {"total": 0}
    async for msg in session.inputs():
        _append_line("EC_TEST_EFFECTS", f"{os.getpid()} {session.id} {msg.seq}")
        async with session.run("add") as run:
            state = {"total": state["total"] + int(msg.payload)}
            await run.emit("message", state)
        await session.checkpoint(state)
