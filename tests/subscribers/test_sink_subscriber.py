"""Any sink as a subscriber: off the hot path, at least once, retried, poison dead-lettered."""

from __future__ import annotations

import json
from collections.abc import Sequence

import anyio
from subscriber_helpers import all_keys, fast, populate

from eventcore import EventLog
from eventcore.sinks import FilterSink, MemorySink, Published
from eventcore.subscribers import SinkSubscriber, SubscriberRunner


async def test_sink_gets_every_envelope_off_the_hot_path(event_log: EventLog) -> None:
    sink = MemorySink()
    async with SubscriberRunner(event_log, SinkSubscriber(sink), **fast()):
        last = await populate(event_log, 5, 8)
        with anyio.fail_after(20):
            await sink.wait_for(len(all_keys(last)))
    assert {(p.session_id, p.seq) for p in sink.published} == all_keys(last)
    assert all(p.stream == f"session/{p.session_id}" for p in sink.published)
    for sid, envs in sink.by_session().items():
        assert [e.seq for e in envs] == list(range(1, last[sid] + 1))


async def test_failing_sink_is_retried_with_backoff_until_it_works(event_log: EventLog) -> None:
    sink = MemorySink()
    sink.fail(RuntimeError("flaky"), times=3)
    runner = SubscriberRunner(event_log, SinkSubscriber(sink), max_deliveries=10, **fast())
    last = await populate(event_log, 2, 4)
    await runner.drain()
    assert {(p.session_id, p.seq) for p in sink.published} == all_keys(last)
    assert sink.failures == 3 and runner.metrics.dead_lettered == 0
    assert runner.metrics.redeliveries > 0
    assert (await runner.refresh_metrics()).pending == 0


async def test_sink_outage_never_dead_letters(event_log: EventLog) -> None:
    sink = MemorySink()
    sink.fail(ConnectionRefusedError("sink host down"), times=12)  # more than max_deliveries
    runner = SubscriberRunner(event_log, SinkSubscriber(sink), max_deliveries=2, **fast())
    last = await populate(event_log, 1, 3)
    await runner.drain()
    assert {(p.session_id, p.seq) for p in sink.published} == all_keys(last)
    assert sink.failures == 12
    assert runner.metrics.dead_lettered == 0 and runner.metrics.transient_failures >= 12


class PickySink:
    """Rejects one envelope forever; takes everything else."""

    def __init__(self, bad: tuple[str, int]) -> None:
        self.bad = bad
        self.got: list[Published] = []

    async def send(self, envelopes: Sequence[Published]) -> None:
        if any((p.session_id, p.seq) == self.bad for p in envelopes):
            raise ValueError("cannot take this one")
        self.got += envelopes

    async def aclose(self) -> None:
        pass


async def test_poison_envelope_goes_to_dead_letter(event_log: EventLog) -> None:
    last = await populate(event_log, 3, 5)
    bad = (next(iter(last)), 3)
    sink = PickySink(bad)
    runner = SubscriberRunner(event_log, SinkSubscriber(sink, name="audit"), max_deliveries=4,
                              **fast())
    await runner.drain()
    assert {(p.session_id, p.seq) for p in sink.got} == all_keys(last) - {bad}
    dead = [f for s in event_log.keys.all_shards()
            for _, f in await event_log.redis.xrange(event_log.keys.dead(s))]
    assert len(dead) == 1
    assert dead[0][b"group"] == b"audit" and dead[0][b"deliveries"] == b"4"
    assert json.loads(dead[0][b"error"])["message"] == "cannot take this one"
    assert (dead[0][b"f.sid"].decode(), int(dead[0][b"f.seq"])) == bad


async def test_sink_by_entry_point_name_behind_a_filter(event_log: EventLog) -> None:
    inner = MemorySink()
    sub = SinkSubscriber(FilterSink(inner, types=["session.*"]))
    last = await populate(event_log, 3, 4)
    await SubscriberRunner(event_log, sub, **fast()).drain()
    assert sorted((p.session_id, p.seq) for p in inner.published) == sorted(
        (sid, 1) for sid in last
    )
    example = SinkSubscriber("example", name="counts")
    await SubscriberRunner(event_log, example, **fast()).drain()
    assert example.sink.counts == {"session.created": 3, "message": 12}  # type: ignore[attr-defined]
    await example.aclose()
    assert example.sink.closed  # type: ignore[attr-defined]
