"""Sinks: the publish path (log first, then hook and inline sinks), built-ins, and plugging."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from eventcore import ConfigError, Envelope, EventLog, SessionNotFound, SinkFailed
from eventcore.sinks import (
    FanoutSink,
    FilterSink,
    JsonlSink,
    MemorySink,
    Published,
    Publisher,
    RedisLogSink,
    Sink,
    configured_sinks,
    load_sink,
)
from eventcore.testing.invariants import check_log, read_all


def env(sid: str, type: str = "message", **kw: object) -> Envelope:
    return Envelope(type=type, session_id=sid, payload=kw or None)


async def test_redis_log_sink_assigns_seq_and_stream(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sink = RedisLogSink(event_log)
    got = await sink.publish([env(s.session_id, n=1), env(s.session_id, n=2)])
    assert [(p.stream, p.seq, p.duplicate) for p in got] == [
        (f"session/{s.session_id}", 2, False), (f"session/{s.session_id}", 3, False)
    ]
    assert [p.envelope.seq for p in got] == [2, 3]
    assert all(p.envelope.event_key for p in got)  # keyed before the append, so retry-safe
    again = await sink.publish([p.envelope for p in got])
    assert [(p.seq, p.duplicate) for p in again] == [(2, True), (3, True)]
    check_log(await read_all(event_log, s.session_id))


async def test_publisher_hook_sees_each_envelope_in_order(event_log: EventLog) -> None:
    s = await event_log.create_session()
    seen: list[Published] = []

    async def hook(p: Published) -> None:
        seen.append(p)

    async with Publisher(event_log, on_published=hook) as pub:
        out = await pub.publish([env(s.session_id, n=i) for i in range(5)])
        one = await pub.publish_one(env(s.session_id, n=5))
    assert seen == [*out, one]
    assert [p.seq for p in seen] == [2, 3, 4, 5, 6, 7]
    assert {p.stream for p in seen} == {f"session/{s.session_id}"}


async def test_hook_failure_reaches_caller_and_retry_is_safe(event_log: EventLog) -> None:
    s = await event_log.create_session()
    calls: list[tuple[int, bool]] = []

    async def hook(p: Published) -> None:
        calls.append((p.seq, p.duplicate))
        if len(calls) == 2:
            raise RuntimeError("downstream said no")

    pub = Publisher(event_log, on_published=hook)
    with pytest.raises(SinkFailed) as caught:
        await pub.publish([env(s.session_id, n=1), env(s.session_id, n=2)])
    err = caught.value
    assert isinstance(err.__cause__, RuntimeError) and "downstream said no" in str(err)
    assert err.stage == "on_published hook"
    # The events happened: the log has them once, whatever the hook did.
    assert [p.seq for p in err.published] == [2, 3]
    assert [e.seq for e in await read_all(event_log, s.session_id)] == [1, 2, 3]
    retried = await pub.publish([p.envelope for p in err.published])
    assert [(p.seq, p.duplicate) for p in retried] == [(2, True), (3, True)]
    assert calls[-2:] == [(2, True), (3, True)]
    check_log(await read_all(event_log, s.session_id))


async def test_log_refusal_is_raised_before_any_sink(event_log: EventLog) -> None:
    sink = MemorySink()
    pub = Publisher(event_log, inline=[sink])
    with pytest.raises(SessionNotFound):
        await pub.publish([env("no-such-session")])
    assert sink.sends == 0


async def test_slow_inline_sink_times_out_without_touching_the_log(event_log: EventLog) -> None:
    s = await event_log.create_session()
    slow, fast = MemorySink(delay=30), MemorySink()
    pub = Publisher(event_log, inline=[fast, slow], timeout_s=0.2)
    with pytest.raises(SinkFailed) as caught:
        await pub.publish([env(s.session_id, n=1)])
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert caught.value.stage == "inline sink"
    assert [p.seq for p in fast.published] == [2]  # the fast one was not held back
    assert slow.published == []
    log = await read_all(event_log, s.session_id)
    check_log(log)
    assert [e.seq for e in log] == [1, 2]


async def test_failing_inline_sink_reports_every_failure(event_log: EventLog) -> None:
    s = await event_log.create_session()
    a, b = MemorySink(), MemorySink()
    b.fail(ValueError("b broke"))
    pub = Publisher(event_log, inline=[a, b])
    with pytest.raises(SinkFailed) as caught:
        await pub.publish([env(s.session_id)])
    cause = caught.value.__cause__
    assert isinstance(cause, ExceptionGroup)
    assert [str(e) for e in cause.exceptions] == ["b broke"]
    assert len(a.published) == 1 and b.published == []
    await pub.publish([p.envelope for p in caught.value.published])  # b works again
    assert len(b.published) == 1 and b.published[0].duplicate


async def test_memory_sink_waits_and_groups(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sink = MemorySink()
    pub = Publisher(event_log, inline=[sink])

    async def later() -> None:
        await pub.publish([env(s.session_id, n=1)])
        await pub.publish([env(s.session_id, n=2)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        with anyio.fail_after(10):
            got = await sink.wait_for(2)
    assert [p.seq for p in got] == [2, 3]
    assert [e.seq for e in sink.by_session()[s.session_id]] == [2, 3]
    await sink.aclose()
    with pytest.raises(RuntimeError):
        await sink.send(got)


async def test_jsonl_sink_writes_lines_without_server_data(tmp_path: Path) -> None:
    e1 = Envelope(seq=1, type="signal", session_id="s1", payload={"key": "k", "value": 1},
                  server_data={"secret": 1})
    e2 = Envelope(seq=2, type="message", session_id="s1", payload="hi ✓")
    sink = JsonlSink(tmp_path / "out" / "events.jsonl", fsync=True)
    await sink.send([Published.of(e1)])
    await sink.send([Published.of(e2)])
    await sink.aclose()
    lines = [json.loads(x) for x in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert [(x["stream"], x["seq"]) for x in lines] == [("session/s1", 1), ("session/s1", 2)]
    assert "server_data" not in lines[0]["envelope"]
    assert lines[1]["envelope"]["payload"] == "hi ✓"
    full = JsonlSink(tmp_path / "full.jsonl", include_server_data=True)
    await full.send([Published.of(e1)])
    await full.aclose()
    assert json.loads((tmp_path / "full.jsonl").read_text())["envelope"]["server_data"] == {
        "secret": 1
    }


async def test_filter_sink_by_type_pattern_session_and_predicate() -> None:
    out = MemorySink()
    items = [
        Published.of(Envelope(seq=i, type=t, session_id=sid, payload=i))
        for i, (t, sid) in enumerate(
            [("run.started", "a"), ("run.completed", "b"), ("message", "a"), ("signal", "a")],
            start=1,
        )
    ]
    await FilterSink(out, types=["run.*", "signal"]).send(items)
    assert [p.type for p in out.published] == ["run.started", "run.completed", "signal"]
    out.published.clear()
    await FilterSink(out, types=["run.*"], sessions=["a"]).send(items)
    assert [p.seq for p in out.published] == [1]
    out.published.clear()
    await FilterSink(out, predicate=lambda p: p.seq % 2 == 0).send(items)
    assert [p.seq for p in out.published] == [2, 4]
    out.published.clear()
    await FilterSink(out, types=["nothing"]).send(items)
    assert out.sends == 3  # nothing matched: the inner sink was not called at all


async def test_fanout_sends_to_all_and_closes_all() -> None:
    a, b = MemorySink(), MemorySink()
    fan = FanoutSink(a, b)
    p = Published.of(Envelope(seq=1, type="x", session_id="s"))
    await fan.send([p])
    assert a.published == b.published == [p]
    await fan.aclose()
    assert a.closed and b.closed


class _Dotted:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.got: list[Published] = []

    async def send(self, envelopes: Sequence[Published]) -> None:
        self.got += envelopes

    async def aclose(self) -> None:
        pass


def test_load_sink_by_object_path_and_entry_point(tmp_path: Path) -> None:
    obj = MemorySink()
    assert load_sink(obj) is obj
    mod = types.ModuleType("ec_test_sinkmod")
    mod.Dotted = _Dotted  # type: ignore[attr-defined]
    sys.modules["ec_test_sinkmod"] = mod
    try:
        by_colon = load_sink("ec_test_sinkmod:Dotted", prefix="x")
        by_dot = load_sink("ec_test_sinkmod.Dotted")
        assert isinstance(by_colon, _Dotted) and by_colon.prefix == "x"
        assert isinstance(by_dot, _Dotted)
    finally:
        del sys.modules["ec_test_sinkmod"]
    assert isinstance(load_sink("memory"), MemorySink)
    jsonl = load_sink("jsonl", path=tmp_path / "x.jsonl")
    assert isinstance(jsonl, JsonlSink)
    # A third-party package (tests/plugins/eventcore-sink-example, installed by
    # scripts/bootstrap) registers "example" in the eventcore.sinks entry-point group.
    example = load_sink("example", label="hello")
    assert type(example).__module__ == "eventcore_sink_example"
    assert isinstance(example, Sink) and example.label == "hello"  # type: ignore[attr-defined]


async def test_entry_point_sink_receives_envelopes() -> None:
    sink = load_sink("example")
    await sink.send([Published.of(Envelope(seq=1, type="message", session_id="s"))] * 3)
    assert sink.counts == {"message": 3}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-sink", "no sink named 'no-such-sink'"),
        ("no_such_module_xyz:Thing", "cannot import"),
        ("sinks:NoSuchThing", "has no 'NoSuchThing'"),
        ("collections:OrderedDict", "has no async send"),
        (42, "neither a sink"),
    ],
)
def test_load_sink_errors_are_clear(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sink(spec)


def test_load_sink_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="rejected its options"):
        load_sink("memory", no_such_option=1)


def test_configured_sinks_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EVENTCORE_SINKS", json.dumps([
        "memory",
        {"sink": "jsonl", "options": {"path": str(tmp_path / "a.jsonl")}, "mode": "inline"},
        {"sink": "example"},
    ]))
    got = configured_sinks()
    assert [(s.sink, s.mode) for s, _ in got] == [
        ("memory", "subscriber"), ("jsonl", "inline"), ("example", "subscriber")
    ]
    assert isinstance(got[1][1], JsonlSink)
    with pytest.raises(ConfigError, match="EVENTCORE_SINKS"):
        configured_sinks('[{"sink": "memory", "mode": "sometimes"}]')
    assert configured_sinks("[]") == []
