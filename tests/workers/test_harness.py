"""eventcore.workers.run_agent: an agent tested end to end against the real Redis fixture."""

from __future__ import annotations

import re
from pathlib import Path

from eventcore import EventLog
from eventcore.errors import TerminalError
from eventcore.testing.invariants import check_log
from eventcore.workers import App, Session, run_agent

app = App()


@app.agent("shout")
async def shout(session: Session) -> None:
    async for msg in session.inputs():
        if msg.payload == "bye":
            await session.end()
            return
        if msg.payload == "boom":
            raise TerminalError("asked to fail")
        async with session.run("reply") as run:
            await run.emit("message", {"text": str(msg.payload).upper()})


async def test_inputs_in_events_out(event_log: EventLog) -> None:
    got = await run_agent(app, event_log, "shout", ["hi", "there"])
    check_log(got.events)
    assert got.payloads("input") == ["hi", "there"]
    assert got.payloads("message") == [{"text": "HI"}, {"text": "THERE"}]
    assert [e.type for e in got.of_type("run.started", "run.completed")] == [
        "run.started", "run.completed"] * 2
    assert got.state == "open"  # waiting for the next input


async def test_a_second_turn_replays_and_answers_only_the_new_input(event_log: EventLog) -> None:
    first = await run_agent(app, event_log, "shout", ["one"])
    again = await run_agent(app, event_log, "shout", ["two", "bye"],
                            session_id=first.session_id)
    assert again.session_id == first.session_id
    check_log(again.events)
    assert again.events[: len(first.events)] == list(first.events)
    assert again.payloads("message") == [{"text": "ONE"}, {"text": "TWO"}]  # "one" once
    assert again.state == "ended"
    assert (await event_log.get_session(first.session_id)).state == "ended"


async def test_a_failing_handler_is_recorded(event_log: EventLog) -> None:
    got = await run_agent(app, event_log, "shout", ["boom"])
    ended = got.of_type("session.ended")
    assert len(ended) == 1 and got.state == "ended"
    assert "asked to fail" in str(ended[0].payload)


async def test_the_readme_example(event_log: EventLog) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```python\n(from eventcore.workers import App, Session, run_agent\n.*?)```",
                      readme, re.S)
    assert block is not None
    scope: dict[str, object] = {}
    exec(block.group(1), scope)  # the README's code, verbatim
    await scope["test_shout"](event_log)  # type: ignore[operator]
