"""The session read model and the pure fold that builds it from a session's envelopes."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from eventcore import (
    EffectPayload,
    Envelope,
    ErrorInfo,
    RunPayload,
    SessionCreatedPayload,
    SessionEndedPayload,
    SignalPayload,
    SignalSummary,
    ToolPayload,
    decode_payload,
)
from eventcore._values import value_problem

__all__ = [
    "MAX_RECENT_TOOL_CALLS",
    "MAX_RUNS",
    "EffectView",
    "RunView",
    "SessionView",
    "SignalView",
    "ToolCallView",
    "apply_event",
    "fold",
]

MAX_RUNS: Final = 50
MAX_RECENT_TOOL_CALLS: Final = 20

_RUN_END = {
    "run.completed": "completed",
    "run.failed": "failed",
    "run.cancelled": "cancelled",
    "run.timed_out": "timed_out",
}
# Worker-side lifecycle events; any other type leaves the status alone.
_ACTIVE = {"session.started", "session.hosted", "session.resumed", "run.started"}
_IDLE = {"session.idle", "session.unloaded"}


class RunView(msgspec.Struct, kw_only=True, omit_defaults=True):
    run_id: str
    name: str | None = None
    status: str = "running"  # running | completed | failed | cancelled | timed_out
    started_seq: int = 0
    started_at: _dt.datetime | None = None
    ended_at: _dt.datetime | None = None
    duration_ms: float | None = None
    tool_calls: int = 0
    error: ErrorInfo | None = None


class ToolCallView(msgspec.Struct, kw_only=True, omit_defaults=True):
    call_id: str
    tool: str
    run_id: str | None = None
    status: str = "running"  # running | ok | failed
    seq: int = 0
    started_at: _dt.datetime | None = None
    ended_at: _dt.datetime | None = None
    duration_ms: float | None = None
    error: ErrorInfo | None = None


class SignalView(msgspec.Struct, kw_only=True, omit_defaults=True):
    seq: int
    value: Any = None
    summary: SignalSummary | None = None
    ts: _dt.datetime | None = None


class EffectView(msgspec.Struct, kw_only=True, omit_defaults=True):
    seq: int
    status: str
    attempt: int = 1
    error: ErrorInfo | None = None


class SessionView(msgspec.Struct, kw_only=True):
    """A session's state as the projector folds it from the log (``GET /v1/sessions/{id}``).

    ``runs`` keeps the latest :data:`MAX_RUNS` runs (``run_count`` counts all),
    ``recent_tool_calls`` the latest :data:`MAX_RECENT_TOOL_CALLS` calls (``tool_calls`` counts
    calls per tool). ``malformed`` counts built-in events whose payload did not match their
    type: they are counted in ``counts`` but change nothing else.
    """

    session_id: str
    status: str = "created"  # created | active | idle | ended
    agent: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    current_run: str | None = None
    runs: list[RunView] = msgspec.field(default_factory=list)
    run_count: int = 0
    tool_calls: dict[str, int] = msgspec.field(default_factory=dict)
    recent_tool_calls: list[ToolCallView] = msgspec.field(default_factory=list)
    signals: dict[str, SignalView] = msgspec.field(default_factory=dict)
    effects: dict[str, EffectView] = msgspec.field(default_factory=dict)
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    last_seq: int = 0
    created_at: _dt.datetime | None = None
    updated_at: _dt.datetime | None = None
    ended_at: _dt.datetime | None = None
    end_reason: str | None = None
    error: ErrorInfo | None = None
    malformed: int = 0


def _ms(start: _dt.datetime | None, end: _dt.datetime) -> float | None:
    return None if start is None else (end - start).total_seconds() * 1000


def _run_key(env: Envelope, payload: RunPayload) -> str:
    return env.run_id or f"{payload.name}"


def _find_run(view: SessionView, run_id: str) -> RunView | None:
    for run in reversed(view.runs):
        if run.run_id == run_id:
            return run
    return None


def _on_run(view: SessionView, env: Envelope, p: RunPayload) -> None:
    run_id = _run_key(env, p)
    if env.type == "run.started":
        view.runs.append(RunView(run_id=run_id, name=p.name, started_seq=env.seq,
                                 started_at=env.ts))
        view.run_count += 1
        del view.runs[:-MAX_RUNS]
        view.current_run = run_id
        return
    run = _find_run(view, run_id)
    if run is None:  # ended after it left the window (or never seen started): record the end
        run = RunView(run_id=run_id, name=p.name, started_seq=0)
        view.runs.append(run)
        view.run_count += 1
        del view.runs[:-MAX_RUNS]
    run.status = _RUN_END[env.type]
    run.ended_at = env.ts
    run.duration_ms = p.duration_ms if p.duration_ms is not None else _ms(run.started_at, env.ts)
    run.error = p.error
    if view.current_run == run_id:
        running = [r.run_id for r in view.runs if r.status == "running"]
        view.current_run = running[-1] if running else None


def _on_tool(view: SessionView, env: Envelope, p: ToolPayload) -> None:
    if env.type == "tool.started":
        view.tool_calls[p.tool] = view.tool_calls.get(p.tool, 0) + 1
        view.recent_tool_calls.append(ToolCallView(
            call_id=p.call_id, tool=p.tool, run_id=env.run_id, seq=env.seq, started_at=env.ts,
        ))
        del view.recent_tool_calls[:-MAX_RECENT_TOOL_CALLS]
        if env.run_id is not None and (run := _find_run(view, env.run_id)) is not None:
            run.tool_calls += 1
        return
    for call in reversed(view.recent_tool_calls):
        if call.call_id == p.call_id:
            call.status = "failed" if p.error is not None else "ok"
            call.ended_at = env.ts
            call.duration_ms = (
                p.duration_ms if p.duration_ms is not None else _ms(call.started_at, env.ts)
            )
            call.error = p.error
            return


def apply_event(view: SessionView, env: Envelope) -> None:
    """Fold one envelope into ``view`` (in place). Total: never raises on odd payloads."""
    view.counts[env.type] = view.counts.get(env.type, 0) + 1
    view.last_seq = env.seq
    view.updated_at = env.ts
    if view.created_at is None:
        view.created_at = env.ts
    try:
        payload = decode_payload(env)
    except (msgspec.ValidationError, TypeError):
        view.malformed += 1
        return
    t = env.type
    if t == "session.created" and isinstance(payload, SessionCreatedPayload):
        view.agent, view.labels, view.created_at = payload.agent, dict(payload.labels), env.ts
    elif t == "session.ended" and isinstance(payload, SessionEndedPayload):
        view.status, view.ended_at = "ended", env.ts
        view.end_reason, view.error = payload.reason, payload.error
        view.current_run = None
    elif isinstance(payload, RunPayload):
        _on_run(view, env, payload)
    elif isinstance(payload, ToolPayload):
        _on_tool(view, env, payload)
    elif isinstance(payload, SignalPayload):
        value = payload.value
        if value is not None and value_problem(value) is not None:
            # written past the edge's check: a view holding it could not be read back
            view.malformed += 1
            value = None
        view.signals[payload.key] = SignalView(
            seq=env.seq, value=value, summary=payload.summary, ts=env.ts
        )
    elif isinstance(payload, EffectPayload):
        view.effects[payload.key] = EffectView(
            seq=env.seq, status=payload.status, attempt=payload.attempt, error=payload.error
        )
    if view.status != "ended":
        if t in _ACTIVE:
            view.status = "active"
        elif t in _IDLE:
            view.status = "idle"


def fold(envelopes: Iterable[Envelope], view: SessionView | None = None) -> SessionView | None:
    """The view after ``envelopes`` (a session's log in seq order), starting from ``view``."""
    for env in envelopes:
        if view is None:
            view = SessionView(session_id=env.session_id)
        apply_event(view, env)
    return view
