"""Checkpoints: a re-hosted handler starts from its last saved state and is given only the
inputs after it, instead of replaying the session from its first input."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from workers_support import eventually, watching

from eventcore import Envelope, EventLog, client_json, decode_payload
from eventcore.testing.invariants import check_log, read_all
from eventcore.workers import App, Session, Worker

Hosting = Callable[..., AbstractAsyncContextManager[Worker]]

app = App()
#: per session, per hosting: (state it started from, input seqs it was given)
hostings: dict[str, list[tuple[Any, list[int]]]] = {}


@app.agent("tally")
async def tally(session: Session) -> None:
    state = session.restored or {"total": 0}
    seen: list[int] = []
    hostings.setdefault(session.id, []).append((session.restored, seen))
    async for msg in session.inputs():
        seen.append(msg.seq)
        async with session.run("add") as run:
            state = {"total": state["total"] + msg.payload}
            await run.emit("message", state)
        if msg.payload != 0:  # (an input of 0 is handled but not checkpointed)
            await session.checkpoint(state)


async def test_a_rehosted_handler_resumes_from_its_checkpoint(
    event_log: EventLog, hosting: Hosting
) -> None:
    log = event_log
    async with hosting(log, app, idle_timeout_s=0.3) as w, watching(log) as feed:
        s = await log.create_session("tally", input=1)
        sid = s.session_id
        for n in (2, 3, 0):
            await log.append(Envelope(type="input", session_id=sid, payload=n))
        await feed.until(lambda: feed.count(sid, "message") == 4)

        async def idle() -> bool:
            return (await log.get_session(sid)).state == "idle" and w.metrics.unloaded >= 1

        await eventually(idle)
        await log.append(Envelope(type="input", session_id=sid, payload=4))
        await feed.until(lambda: feed.count(sid, "message") == 5)
    events = await read_all(log, sid)
    check_log(events)
    inputs = [e.seq for e in events if e.type == "input"]
    checkpoints = [e for e in events if e.type == "session.checkpoint"]
    assert [decode_payload(c).after for c in checkpoints] == [*inputs[:3], inputs[4]]
    assert [c.server_data for c in checkpoints] == [
        {"total": 1}, {"total": 3}, {"total": 6}, {"total": 10}]
    assert "server_data" not in client_json(checkpoints[0]).decode()
    # the second hosting started from the last checkpoint (after input 3): it was given the
    # uncheckpointed 0 and the new 4, not the session's first three inputs again
    assert hostings[sid] == [(None, inputs[:4]), ({"total": 6}, inputs[3:])]
    assert [e.payload["total"] for e in events if e.type == "message"] == [1, 3, 6, 6, 10]


async def test_a_session_without_checkpoints_replays_from_the_start(
    event_log: EventLog, hosting: Hosting
) -> None:
    log = event_log
    async with hosting(log, app, idle_timeout_s=0.3) as w, watching(log) as feed:
        s = await log.create_session("tally", input=0)
        sid = s.session_id
        await feed.until(lambda: feed.count(sid, "message") == 1)
        await eventually(lambda: w.metrics.unloaded >= 1)
        await log.append(Envelope(type="input", session_id=sid, payload=0))
        await feed.until(lambda: feed.count(sid, "message") == 2)
    inputs = [e.seq for e in await read_all(log, sid) if e.type == "input"]
    assert hostings[sid] == [(None, inputs[:1]), (None, inputs)]
