"""Schedules in one process against a real Redis: the store, exactly-once firing by racing
schedulers on a controlled clock, catch-up policies, DST, and hostile expressions/timezones."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventcore import EventLog, ValidationError, load_settings
from eventcore._schedules import due_between, next_after
from eventcore.schedules import (
    ScheduleConflict,
    ScheduleNotFound,
    Scheduler,
    Schedules,
    occurrence_session_id,
    validate_cron,
    validate_timezone,
)
from eventcore.testing._server import RedisServer
from eventcore.testing.invariants import read_all

T0 = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=dt.UTC).timestamp()  # 30 s past a minute


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _ms(d: dt.datetime) -> int:
    return int(d.timestamp() * 1000)


async def _sessions_of(log: EventLog, schedule_id: str) -> dict[str, Any]:
    """Every session the schedule started, by occurrence label (read from Redis)."""
    out: dict[str, Any] = {}
    async for key in log.redis.scan_iter(match=f"{log.keys.namespace}:*:meta:sch.{schedule_id}.*"):
        sid = key.decode().split(":meta:", 1)[1]
        info = await log.get_session(sid)
        occ = info.labels["occurrence"]
        assert occ not in out, f"occurrence {occ} started twice: {out[occ]} and {sid}"
        out[occ] = info
    return out


async def test_create_get_list_update_delete(event_log: EventLog) -> None:
    clock = Clock(T0)
    s = Schedules(event_log, now=clock)
    made, created = await s.create("nightly", cron="0 3 * * *", agent="echo",
                                   timezone="Europe/Berlin", input={"text": "go"},
                                   labels={"team": "a"})
    assert created and made.enabled and made.revision == 1
    assert made.next_run_at == dt.datetime(2026, 6, 2, 1, 0, tzinfo=dt.UTC)  # 03:00 CEST
    again, created = await s.create("nightly", cron="0 3 * * *", agent="echo",
                                    timezone="Europe/Berlin", input={"text": "go"},
                                    labels={"team": "a"})
    assert not created and again == made
    with pytest.raises(ScheduleConflict):
        await s.create("nightly", cron="0 4 * * *", agent="echo", timezone="Europe/Berlin")
    await s.create("hourly", cron="0 * * * *", agent="echo")
    assert [x.schedule_id for x in await s.list()] == ["hourly", "nightly"]
    off = await s.disable("nightly")
    assert not off.enabled and off.next_run_at is None and off.revision == 2
    clock.t += 86400 * 3  # disabled across three occurrences: enabling does not catch up
    on = await s.enable("nightly")
    assert on.next_run_at == dt.datetime(2026, 6, 5, 1, 0, tzinfo=dt.UTC)
    changed = await s.update("nightly", cron="30 3 * * 1-5", catchup="skip")
    assert changed.cron == "30 3 * * 1-5" and changed.catchup == "skip"
    assert changed.input == {"text": "go"} and changed.labels == {"team": "a"}
    await s.delete("nightly")
    with pytest.raises(ScheduleNotFound):
        await s.get("nightly")
    with pytest.raises(ScheduleNotFound):
        await s.delete("nightly")
    with pytest.raises(ScheduleNotFound):
        await s.update("nightly", enabled=True)


async def test_racing_schedulers_fire_each_minute_once(event_log: EventLog) -> None:
    clock = Clock(T0)
    s = Schedules(event_log, now=clock)
    await s.create("every-minute", cron="* * * * *", agent="echo", input={"n": 1})
    schedulers = [Scheduler(event_log, now=clock, grace_s=600) for _ in range(3)]
    for _ in range(30):
        clock.t += 60
        async with anyio.create_task_group() as tg:
            for sch in schedulers:
                for _ in range(3):
                    tg.start_soon(sch.tick)
    fired = await _sessions_of(event_log, "every-minute")
    assert len(fired) == 30
    assert sum(x.fired for x in schedulers) == 30
    want = {(dt.datetime(2026, 6, 1, 12, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=i))
            .isoformat().replace("+00:00", "Z") for i in range(30)}
    assert set(fired) == want
    one = next(iter(fired.values()))
    assert one.agent == "echo" and one.labels["schedule"] == "every-minute"
    events = await read_all(event_log, one.session_id)
    assert [e.type for e in events] == ["session.created", "input"]
    assert events[1].payload == {"n": 1}
    got = await s.get("every-minute")
    assert got.fired == 30 and got.skipped == 0
    assert got.last_run_at == dt.datetime(2026, 6, 1, 12, 30, tzinfo=dt.UTC)
    assert got.last_session_id in {x.session_id for x in fired.values()}
    assert got.next_run_at == dt.datetime(2026, 6, 1, 12, 31, tzinfo=dt.UTC)


async def test_the_session_is_dispatched_like_create_session(event_log: EventLog) -> None:
    clock = Clock(T0)
    await Schedules(event_log, now=clock).create("d", cron="* * * * *", agent="echo")
    clock.t += 60
    assert await Scheduler(event_log, now=clock).tick() == 1
    (info,) = (await _sessions_of(event_log, "d")).values()
    sid = info.session_id
    assert event_log.keys.shard_of(sid) == event_log.keys.schedule_shard("d")
    assert sid == occurrence_session_id(event_log.keys, "d", _ms(
        dt.datetime(2026, 6, 1, 12, 1, tzinfo=dt.UTC)))
    dispatch = event_log.keys.dispatch(event_log.keys.shard_of(sid))
    entries = await event_log.redis.xrange(dispatch)
    assert [f[b"sid"].decode() for _, f in entries] == [sid]
    # creating the same session by hand is a duplicate: the id is the occurrence's
    again = await event_log.create_session("echo", session_id=sid)
    assert again.incarnation == info.incarnation


@pytest.mark.parametrize(("policy", "want"), [("skip", 0), ("once", 1), ("all", 5)])
async def test_catchup_policies(event_log: EventLog, policy: str, want: int) -> None:
    clock = Clock(T0)
    s = Schedules(event_log, now=clock)
    await s.create("c", cron="*/10 * * * *", agent="echo", catchup=policy)  # type: ignore[arg-type]
    clock.t += 50 * 60 + 5  # everything down for 50 minutes: 12:10 .. 12:50 due, all late
    sch = Scheduler(event_log, now=clock, grace_s=0, catchup_max=100)
    assert await sch.tick() == want
    fired = await _sessions_of(event_log, "c")
    got = await s.get("c")
    assert got.fired == want and got.skipped == 5 - want
    assert got.next_run_at == dt.datetime(2026, 6, 1, 13, 0, tzinfo=dt.UTC)
    if policy == "once":
        assert set(fired) == {"2026-06-01T12:50:00Z"}
    assert await sch.tick() == 0  # nothing left to fire


async def test_catchup_all_is_bounded_and_the_grace_fires(event_log: EventLog) -> None:
    clock = Clock(T0)
    s = Schedules(event_log, now=clock)
    await s.create("b", cron="* * * * *", agent="echo", catchup="all")
    await s.create("k", cron="* * * * *", agent="echo", catchup="skip")
    clock.t += 20 * 60  # 20 due: the last 2 (12:19, 12:20) within the 90 s grace
    sch = Scheduler(event_log, now=clock, grace_s=90, catchup_max=3)
    assert await sch.tick() == 5 + 2
    assert sorted(await _sessions_of(event_log, "b")) == [
        f"2026-06-01T12:{m}:00Z" for m in (16, 17, 18, 19, 20)]
    assert sorted(await _sessions_of(event_log, "k")) == [
        "2026-06-01T12:19:00Z", "2026-06-01T12:20:00Z"]
    assert (await s.get("b")).skipped == 15 and (await s.get("k")).skipped == 18


@pytest.mark.parametrize(("cron", "start", "want"), [
    # Europe/Berlin, clocks forward 2026-03-29 02:00 -> 03:00: 02:30 does not exist, fires 03:00
    ("30 2 * * *", dt.datetime(2026, 3, 28, 12), ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]),
    # clocks back 2026-10-25 03:00 -> 02:00: 02:30 happens twice, fires once (the first)
    ("30 2 * * *", dt.datetime(2026, 10, 24, 12), ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]),
    # an hour wildcard fires in both instances of the repeated hour (real time)
    ("*/30 * * * *", dt.datetime(2026, 10, 25, 1, 45),
     ["2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z", "2026-10-25T01:00:00Z",
      "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z"]),
])
async def test_dst_transitions_fire_through_the_scheduler(
    event_log: EventLog, cron: str, start: dt.datetime, want: list[str]
) -> None:
    clock = Clock(start.replace(tzinfo=ZoneInfo("Europe/Berlin")).timestamp())
    s = Schedules(event_log, now=clock)
    await s.create("dst", cron=cron, agent="echo", timezone="Europe/Berlin")
    sch = Scheduler(event_log, now=clock, grace_s=3600)
    end = dt.datetime.fromisoformat(want[-1]).timestamp()
    while clock.t < end:
        clock.t += 300  # every 5 minutes, through the transition
        await sch.tick()
    assert sorted(await _sessions_of(event_log, "dst")) == want


def test_dst_arithmetic_new_york() -> None:
    ny = "America/New_York"
    # spring forward 2026-03-08 02:00 -> 03:00; fall back 2026-11-01 02:00 -> 01:00
    spring = next_after("30 2 * * *", ny, _ms(dt.datetime(2026, 3, 7, 12, tzinfo=dt.UTC)))
    assert spring == _ms(dt.datetime(2026, 3, 8, 7, 0, tzinfo=dt.UTC))  # 03:00 EDT
    fall = due_between("30 1 * * *", ny, _ms(dt.datetime(2026, 11, 1, 0, tzinfo=dt.UTC)),
                       _ms(dt.datetime(2026, 11, 2, 0, tzinfo=dt.UTC)))
    assert fall == [_ms(dt.datetime(2026, 11, 1, 5, 30, tzinfo=dt.UTC))]  # 01:30 EDT, once
    every = due_between("15 * * * *", ny, _ms(dt.datetime(2026, 11, 1, 5, tzinfo=dt.UTC)),
                        _ms(dt.datetime(2026, 11, 1, 7, tzinfo=dt.UTC)))
    assert len(every) == 2  # 01:15 EDT and 01:15 EST


@pytest.mark.parametrize("expr", ["", "* * * *", "* * * * * *", "61 * * * *", "* 24 * * *",
                                  "0 0 30 2 *", "*/0 * * * *", "@daily", "a b c d e",
                                  "* * * * 8", "1-", "\x00 * * * *", "x" * 300])
def test_invalid_cron_is_a_validation_error(expr: str) -> None:
    with pytest.raises(ValidationError, match="cron expression"):
        validate_cron(expr)


@pytest.mark.parametrize("tz", ["", "Mars/Olympus", "../../etc/passwd", "/etc/localtime",
                                "Europe/", "UTC\x00", "Europe/Berlin ", "x" * 100])
def test_invalid_timezone_is_a_validation_error(tz: str) -> None:
    with pytest.raises(ValidationError, match="timezone"):
        validate_timezone(tz)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"[0-9*/,\-A-Za-z ]{1,30}", fullmatch=True))
def test_fuzz_cron_strings_validate_or_refuse(expr: str) -> None:
    try:
        cron = validate_cron(expr)
    except ValidationError:
        return
    assert next_after(cron, "UTC", 0) > 0  # what is accepted can be computed


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"[A-Za-z_/+\-0-9.]{1,30}", fullmatch=True))
def test_fuzz_timezones_validate_or_refuse(tz: str) -> None:
    try:
        name = validate_timezone(tz)
    except ValidationError:
        return
    assert next_after("0 0 * * *", name, 0) > 0


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expr=st.from_regex(r"[0-9*/,\-]{1,6} [0-9*/,\-]{1,6} \* \* \*", fullmatch=True),
       tz=st.sampled_from(["UTC", "Europe/Berlin", "Nope/Nowhere", "Asia/Kathmandu"]))
async def test_fuzz_create_validates_before_writing(event_log: EventLog, expr: str,
                                                    tz: str) -> None:
    s = Schedules(event_log, now=Clock(T0))
    try:
        made, _ = await s.create("fz", cron=expr, agent="echo", timezone=tz)
    except ValidationError as exc:
        assert "cron" in str(exc) or "timezone" in str(exc)
        with pytest.raises(ScheduleNotFound):
            await s.get("fz")
        return
    assert made.next_run_at is not None
    await s.delete("fz")


async def test_a_month_down_catches_up_within_bounds(event_log: EventLog) -> None:
    clock = Clock(T0)
    s = Schedules(event_log, now=clock)
    await s.create("long", cron="* * * * *", agent="echo", catchup="all")
    await s.create("one", cron="* * * * *", agent="echo", catchup="once")
    clock.t += 30 * 86400  # 43200 minutely occurrences missed
    sch = Scheduler(event_log, now=clock, grace_s=0, catchup_max=10)
    assert await sch.tick() == 11
    assert len(await _sessions_of(event_log, "long")) == 10
    assert len(await _sessions_of(event_log, "one")) == 1
    for sid in ("long", "one"):
        got = await s.get(sid)
        assert got.next_run_at is not None and got.next_run_at.timestamp() > clock.t
        assert got.skipped >= 9_990  # counted up to what one look enumerates
    assert await sch.tick() == 0


async def _until(check: Callable[[], bool]) -> None:
    """Poll with a deadline (the scheduler's counters have no event to wait on)."""
    with anyio.fail_after(30):
        while True:
            if check():
                return
            await anyio.sleep(0.01)


@pytest.mark.redis_restart
async def test_the_scheduler_outlives_redis_being_down(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    clock = Clock(T0)
    settings = load_settings(redis_url=server.url, namespace="down", shards=4,
                             retry_budget_s=0.3)
    async with EventLog(settings) as log:
        await Schedules(log, now=clock).create("x", cron="* * * * *", agent="echo")
        async with Scheduler(log, now=clock, interval_s=0.02, grace_s=600) as sch:
            server.stop()  # longer than the retry budget
            clock.t += 60
            await _until(lambda: sch.failures >= 3)  # looks failed, the scheduler lives on
            server.start()
            await _until(lambda: sch.fired == 1)
        assert (await Schedules(log).get("x")).fired == 1


async def test_an_occurrence_whose_session_exists_starts_nothing(event_log: EventLog) -> None:
    """The session id of an occurrence is the dedupe of last resort: an occurrence fired again
    (a schedule's expression changed back, a clock behind) finds its session and adds none."""
    clock = Clock(T0)
    s = Schedules(event_log, now=clock)
    await s.create("again", cron="* * * * *", agent="echo")
    occ = _ms(dt.datetime(2026, 6, 1, 12, 1, tzinfo=dt.UTC))
    sid = occurrence_session_id(event_log.keys, "again", occ)
    made = await event_log.create_session("echo", session_id=sid)
    clock.t += 60
    assert await Scheduler(event_log, now=clock).tick() == 0
    got = await s.get("again")
    assert got.fired == 0 and got.last_session_id == sid
    assert got.next_run_at == dt.datetime(2026, 6, 1, 12, 2, tzinfo=dt.UTC)
    assert (await event_log.get_session(sid)).incarnation == made.incarnation
