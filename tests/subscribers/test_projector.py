"""The projector: the session read model, exactly once and in order whatever the delivery."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from subscriber_helpers import fast

from eventcore import (
    EffectPayload,
    Envelope,
    ErrorInfo,
    EventLog,
    RunPayload,
    ToolPayload,
)
from eventcore.subscribers import (
    MAX_RECENT_TOOL_CALLS,
    Delivery,
    Projector,
    SessionView,
    SubscriberRunner,
    fold,
    read_view,
)
from eventcore.testing.invariants import read_all


async def test_view_of_a_session_with_runs_tools_signals_effects(event_log: EventLog) -> None:
    s = await event_log.create_session("support", labels={"tier": "gold"})
    sid = s.session_id

    async def emit(type: str, payload: Any, run_id: str | None = None) -> None:
        await event_log.append(Envelope(type=type, session_id=sid, payload=payload,
                                        run_id=run_id))

    await emit("run.started", RunPayload(name="answer"), "r1")
    await emit("tool.started", ToolPayload(tool="search", call_id="c1", args={"q": "x"}), "r1")
    await emit("tool.ended", ToolPayload(tool="search", call_id="c1", result=[1],
                                         duration_ms=12.5), "r1")
    await emit("tool.started", ToolPayload(tool="fetch", call_id="c2"), "r1")
    await emit("tool.ended", ToolPayload(tool="fetch", call_id="c2",
                                         error=ErrorInfo(type="Timeout", message="slow")), "r1")
    await event_log.signal(sid, "status", "typing")
    await event_log.signal(sid, "status", "done")
    assert await event_log.effect(sid, "charge", _answer) == 42
    await emit("run.completed", RunPayload(name="answer", duration_ms=99.0), "r1")
    await emit("run.started", RunPayload(name="followup"), "r2")
    await emit("run.failed", RunPayload(name="followup", error=ErrorInfo(
        type="Boom", message="no", retryable=False)), "r2")
    await emit("run.started", RunPayload(name="third"), "r3")
    await emit("message", {"text": "hi"}, "r3")

    proj = Projector(event_log)
    await SubscriberRunner(event_log, proj, **fast()).drain()
    view = await read_view(event_log, sid)
    assert view is not None
    assert (view.status, view.agent, view.labels) == ("active", "support", {"tier": "gold"})
    assert view.current_run == "r3"
    assert [(r.run_id, r.name, r.status) for r in view.runs] == [
        ("r1", "answer", "completed"), ("r2", "followup", "failed"), ("r3", "third", "running")
    ]
    assert view.runs[0].duration_ms == 99.0 and view.runs[0].tool_calls == 2
    assert view.runs[1].duration_ms is not None and view.runs[1].duration_ms >= 0
    assert view.runs[1].error is not None and view.runs[1].error.type == "Boom"
    assert view.tool_calls == {"search": 1, "fetch": 1}
    assert [(c.call_id, c.status) for c in view.recent_tool_calls] == [("c1", "ok"),
                                                                       ("c2", "failed")]
    assert view.recent_tool_calls[0].duration_ms == 12.5
    assert view.signals["status"].value == "done"
    assert view.effects["charge"].status == "ok"
    assert view.counts["tool.started"] == 2 and view.counts["signal"] == 2
    log = await read_all(event_log, sid)
    assert view.last_seq == log[-1].seq
    assert view.created_at == log[0].ts and view.updated_at == log[-1].ts
    assert view == fold(log)

    await event_log.end_session(sid, "completed")
    await SubscriberRunner(event_log, proj, **fast()).drain()
    view = await read_view(event_log, sid)
    assert view is not None
    assert (view.status, view.end_reason, view.current_run) == ("ended", "completed", None)
    assert view.ended_at is not None
    ttl = await event_log.redis.ttl(event_log.keys.view(sid))
    assert 0 < ttl <= event_log.settings.session_ttl_s  # expires with the session


async def _answer() -> int:
    return 42


async def test_read_view_of_unknown_session_is_none(event_log: EventLog) -> None:
    assert await read_view(event_log, "never-was") is None


async def test_odd_payloads_are_counted_not_fatal(event_log: EventLog) -> None:
    s = await event_log.create_session()
    await event_log.append(Envelope(type="run.started", session_id=s.session_id,
                                    payload="not a run payload"))
    await event_log.append(Envelope(type="tool.ended", session_id=s.session_id,
                                    payload={"tool": "t", "call_id": "never-started"}))
    await event_log.append(Envelope(type="custom.thing", session_id=s.session_id, payload=[1]))
    runner = SubscriberRunner(event_log, Projector(event_log), **fast())
    await runner.drain()
    view = await read_view(event_log, s.session_id)
    assert view is not None and view.malformed == 1
    assert view.counts == {"session.created": 1, "run.started": 1, "tool.ended": 1,
                           "custom.thing": 1}
    assert runner.metrics.dead_lettered == 0


async def test_a_deleted_sessions_view_goes_with_it(event_log: EventLog) -> None:
    s = await event_log.create_session(labels={"a": "1"})
    proj = Projector(event_log)
    await SubscriberRunner(event_log, proj, **fast()).drain()
    assert await read_view(event_log, s.session_id) is not None
    await event_log.delete_session(s.session_id)
    assert await read_view(event_log, s.session_id) is None  # at once, with its keys
    # the session's end and its deletion, still in the feed, do not bring it back
    await SubscriberRunner(event_log, proj, **fast()).drain()
    assert not await event_log.redis.exists(event_log.keys.view(s.session_id))


@pytest.mark.parametrize("lagging", [False, True], ids=["caught-up", "lagging"])
async def test_a_recreated_session_id_gets_a_view_of_its_own(
    event_log: EventLog, lagging: bool
) -> None:
    sid = f"reused-{uuid.uuid4().hex[:8]}"
    old = await event_log.create_session(session_id=sid, labels={"gen": "old"})
    await event_log.signal(sid, "old-signal", 1)
    await event_log.append(Envelope(type="run.started", session_id=sid, run_id="r-old",
                                    payload=RunPayload(name="old")))
    proj = Projector(event_log)
    if not lagging:
        await SubscriberRunner(event_log, proj, **fast()).drain()
    await event_log.delete_session(sid)
    new = await event_log.create_session(session_id=sid, labels={"gen": "new"})
    assert new.incarnation > old.incarnation
    await event_log.signal(sid, "new-signal", 2)
    await SubscriberRunner(event_log, proj, **fast()).drain()
    view = await read_view(event_log, sid, incarnation=new.incarnation)
    assert view is not None and view == fold(await read_all(event_log, sid))
    assert (view.labels, list(view.signals), view.runs) == ({"gen": "new"}, ["new-signal"], [])
    assert await event_log.redis.ttl(event_log.keys.view(sid)) == -1


async def test_the_view_of_an_expired_predecessor_is_not_shown(event_log: EventLog) -> None:
    sid = f"reused-{uuid.uuid4().hex[:8]}"
    await event_log.create_session(session_id=sid, labels={"gen": "old"})
    await event_log.end_session(sid)
    proj = Projector(event_log)
    await SubscriberRunner(event_log, proj, **fast()).drain()
    await event_log.redis.delete(*event_log.keys.session(sid).per_session)  # its TTL ran out
    new = await event_log.create_session(session_id=sid, labels={"gen": "new"})
    # the old view outlives its session a little: not the new session's
    assert await read_view(event_log, sid) is not None
    assert await read_view(event_log, sid, incarnation=new.incarnation) is None
    await SubscriberRunner(event_log, proj, **fast()).drain()
    view = await read_view(event_log, sid, incarnation=new.incarnation)
    assert view is not None and (view.status, view.labels) == ("created", {"gen": "new"})
    assert await event_log.redis.ttl(event_log.keys.view(sid)) == -1  # not the old expiry


def test_tool_call_window_is_bounded() -> None:
    envs = [Envelope(seq=1, type="session.created", session_id="s", payload={})]
    for i in range(MAX_RECENT_TOOL_CALLS + 5):
        envs.append(Envelope(seq=len(envs) + 1, type="tool.started", session_id="s",
                             payload={"tool": "t", "call_id": f"c{i}"}))
    view = fold(envs)
    assert view is not None
    assert len(view.recent_tool_calls) == MAX_RECENT_TOOL_CALLS
    assert view.tool_calls == {"t": MAX_RECENT_TOOL_CALLS + 5}
    assert view.recent_tool_calls[-1].call_id == f"c{MAX_RECENT_TOOL_CALLS + 4}"


# -- property: projected state == pure fold, for any delivery order with duplicates ----------

_RUN_ENDS = ["run.completed", "run.failed", "run.cancelled", "run.timed_out"]


@st.composite
def session_events(draw: st.DrawFn, sid: str) -> list[Envelope]:
    out: list[Envelope] = []
    runs: list[str] = []
    calls: list[str] = []
    for i in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["run", "end_run", "tool", "tool_end", "signal", "effect",
                                     "message", "idle"]))
        run_id = draw(st.sampled_from(runs)) if runs and draw(st.booleans()) else None
        if kind == "run":
            runs.append(f"r{i}")
            env = Envelope(type="run.started", session_id=sid, run_id=runs[-1],
                           payload=RunPayload(name=f"n{i}"))
        elif kind == "end_run" and runs:
            env = Envelope(type=draw(st.sampled_from(_RUN_ENDS)), session_id=sid,
                           run_id=draw(st.sampled_from(runs)), payload=RunPayload(name="x"))
        elif kind == "tool":
            calls.append(f"c{i}")
            env = Envelope(type="tool.started", session_id=sid, run_id=run_id,
                           payload=ToolPayload(tool=draw(st.sampled_from("ab")),
                                               call_id=calls[-1]))
        elif kind == "tool_end" and calls:
            env = Envelope(type="tool.ended", session_id=sid, run_id=run_id,
                           payload=ToolPayload(tool="a", call_id=draw(st.sampled_from(calls))))
        elif kind == "signal":
            env = Envelope(type="signal", session_id=sid, payload={
                "key": draw(st.sampled_from(["status", "mood"])), "value": draw(st.integers())})
        elif kind == "effect":
            env = Envelope(type="effect", session_id=sid, payload=EffectPayload(
                key=draw(st.sampled_from(["e1", "e2"])), status="ok", result=i))
        elif kind == "idle":
            env = Envelope(type="session.idle", session_id=sid)
        else:
            env = Envelope(type="message", session_id=sid, payload={"i": i})
        out.append(env)
    return out


@st.composite
def deliveries_plan(draw: st.DrawFn, n: int) -> list[tuple[int, list[int]]]:
    """Batches of seqs (1..n) for consumer 0 or 1: every seq at least once, in any order, with
    duplicates and redeliveries anywhere."""
    order = list(draw(st.permutations(range(1, n + 1))))
    for _ in range(draw(st.integers(0, n))):
        order.insert(draw(st.integers(0, len(order))), draw(st.integers(1, n)))
    plan = []
    while order:
        size = draw(st.integers(1, max(1, min(8, len(order)))))
        plan.append((draw(st.integers(0, 1)), order[:size]))
        del order[:size]
    return plan


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Envelope], list[tuple[int, list[int]]]]:
    """A session's events (after session.created, with ``session_id`` "SID") and a delivery
    plan for its whole log."""
    envs = draw(session_events("SID"))
    if draw(st.booleans()):
        envs.append(Envelope(type="session.ended", session_id="SID", payload={"reason": "x"}))
    return envs, draw(deliveries_plan(len(envs) + 1))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios())
async def test_projection_equals_fold_for_any_delivery_order(
    event_log: EventLog, scenario: tuple[list[Envelope], list[tuple[int, list[int]]]]
) -> None:
    envs, plan = scenario
    sid = f"p{uuid.uuid4().hex[:12]}"
    await event_log.create_session("agent", session_id=sid)
    await event_log.append_many([msgspec.structs.replace(e, session_id=sid) for e in envs])
    log = await read_all(event_log, sid)
    by_seq = {e.seq: e for e in log}
    assert len(log) == len(envs) + 1
    consumers = [Projector(event_log), Projector(event_log)]  # two instances of one group
    shard = event_log.keys.shard_of(sid)
    for who, seqs in plan:
        batch = [Delivery(f"0-{s}", shard, by_seq[s]) for s in seqs]
        await consumers[who].handle(batch)
    view = await read_view(event_log, sid)
    assert view == fold(log)
    applied = sum(c.stats.applied for c in consumers)
    assert applied == len(log)  # every envelope applied exactly once across both consumers


async def test_concurrent_projectors_apply_each_event_once(event_log: EventLog) -> None:
    s = await event_log.create_session()
    envs = [Envelope(type="message", session_id=s.session_id, payload=i) for i in range(60)]
    await event_log.append_many(envs)
    log = await read_all(event_log, s.session_id)
    shard = event_log.keys.shard_of(s.session_id)
    projectors = [Projector(event_log) for _ in range(4)]

    async def consume(p: Projector, offset: int) -> None:
        for i in range(offset, len(log), 3):
            await p.handle([Delivery(f"0-{i}", shard, log[i])])

    async with anyio.create_task_group() as tg:
        for i, p in enumerate(projectors):
            tg.start_soon(consume, p, i % 3)
    view = await read_view(event_log, s.session_id)
    assert isinstance(view, SessionView) and view == fold(log)
    assert view.counts["message"] == 60
    assert sum(p.stats.applied for p in projectors) == len(log)
