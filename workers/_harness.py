"""Test an agent end to end against a real Redis: feed it inputs, host it in burst mode,
read back what it recorded."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eventcore import Envelope, EventLog
from eventcore.testing.invariants import read_all

from ._app import App
from ._worker import Worker

__all__ = ["AgentRun", "run_agent"]


@dataclass(frozen=True, slots=True)
class AgentRun:
    """What one :func:`run_agent` left in the session's log."""

    session_id: str
    events: Sequence[Envelope]

    def of_type(self, *types: str) -> list[Envelope]:
        """The events of these types, in seq order."""
        return [e for e in self.events if e.type in types]

    def payloads(self, *types: str) -> list[Any]:
        """The payloads of the events of these types, in seq order."""
        return [e.payload for e in self.of_type(*types)]

    @property
    def state(self) -> str:
        """``ended`` once the handler ended the session, else ``open`` (it waits for input)."""
        return "ended" if self.events and self.events[-1].type == "session.ended" else "open"


async def run_agent(
    app: App,
    log: EventLog,
    agent: str,
    inputs: Iterable[Any] = (),
    *,
    session_id: str | None = None,
    labels: Mapping[str, str] | None = None,
    idle_timeout_s: float = 0.5,
    **worker_options: Any,
) -> AgentRun:
    """Create a session of ``agent`` (or, with an existing ``session_id``, append to it),
    append ``inputs`` in order, host it with a :class:`Worker` of ``app`` in burst mode
    (:meth:`Worker.run_burst`: until nothing is left to do and the session ended or idled
    for ``idle_timeout_s``), and return every event of the session.

    Each call is one more turn: call it again with the same ``session_id`` and new inputs, and
    the handler is hosted again (replaying its history, as after any restart)."""
    items = list(inputs)
    last = 0 if session_id is None else await log.last_seq(session_id)
    if session_id is None or last == 0:  # a created session holds session.created at least
        first = items.pop(0) if items else None
        info = await log.create_session(agent, session_id=session_id, labels=labels,
                                        input=first)
        session_id, last = info.session_id, info.last_seq
    sid = session_id
    if items:
        await log.append_many([
            Envelope(type="input", session_id=sid, payload=p,
                     event_key=f"harness-input-{last + i}")
            for i, p in enumerate(items, start=1)])
    worker = Worker(app, log, idle_timeout_s=idle_timeout_s, **worker_options)
    await worker.run_burst()
    return AgentRun(sid, await read_all(log, sid))
