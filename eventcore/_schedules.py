"""Cron schedules that start sessions, safe with any number of scheduler processes.

A schedule is a standard 5-field cron expression read in an IANA timezone, the agent and the
first input / labels of each session it starts, a catch-up policy, and an id chosen by the
caller (creating the same id again is idempotent). It is stored in one hash on the shard of its
id (``ns:{N}:schedule:<id>``) and indexed by its next occurrence in that shard's zset
(``ns:{N}:schedules``), which every :class:`Scheduler` polls.

Exactly once. Firing an occurrence is one Lua script (``_lua/schedule_fire.lua``) in one cluster
slot: it checks that the schedule's ``next`` and revision are still what the caller read,
creates the session through the append script itself (``append.lua``, unchanged, wrapped as a
function inside the same script) and moves ``next`` to the following occurrence. The session
id is derived from (schedule id, occurrence) and chosen so that it lands on the schedule's
shard: ``sch.<schedule id>.<UTC occurrence>[.<n>]`` with the smallest ``n`` that does. So there
is no moment between "advanced" and "created": a crash (or SIGKILL) before the script leaves
the occurrence due for any scheduler, after it leaves it done, and two schedulers racing for an
occurrence find ``next`` moved for all but one (a lost race writes nothing). The occurrence's
session id also makes the creation itself idempotent (a session id exists once).

Missed occurrences. An occurrence is *missed* when it is found due more than ``grace_s`` late
(every scheduler was down). The schedule's ``catchup`` says what to do with them: ``once`` (the
default) starts one session, for the latest missed occurrence; ``all`` starts one per missed
occurrence, oldest first, at most ``catchup_max`` (the most recent ones); ``skip`` starts none.
Occurrences found within the grace always fire. Skipped occurrences are counted.

DST, as cron does it (the cron parser is ``cronsim``): a local time that does not exist (the hour
skipped when clocks go forward) fires at the first moment after the gap (``30 2 * * *`` in
Europe/Berlin fires at 03:00 on the day clocks go forward); a local time that happens twice
(clocks go back) fires once, at its first instance, for expressions with a fixed hour, and at
both instances for expressions whose hour field is ``*`` (``*/15 * * * *`` fires every 15
minutes of real time).
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import os
import random
import re
import time
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, cast

import anyio
import msgspec

from . import _layout as L
from ._append import _result
from ._extras import import_optional
from ._keys import Keys
from ._lifetime import Running
from ._log import EventLog
from ._redis import redis_errors
from ._scripts import lua
from .errors import (
    CorruptEntry,
    EventcoreError,
    RedisError,
    ScheduleConflict,
    ScheduleNotFound,
    ValidationError,
)

__all__ = [
    "CATCHUP_POLICIES",
    "CatchUp",
    "Schedule",
    "ScheduleConflict",
    "ScheduleNotFound",
    "Scheduler",
    "Schedules",
    "iter_occurrences",
    "occurrence_session_id",
    "scheduler_for",
    "validate_cron",
    "validate_schedule_id",
    "validate_timezone",
]

logger = logging.getLogger("eventcore.schedules")

CatchUp = Literal["once", "all", "skip"]
CATCHUP_POLICIES: tuple[CatchUp, ...] = ("once", "all", "skip")

_SCHEDULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}")
_TZ_NAME = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*")
_MAX_CRON = 256
_SCAN_LIMIT = 10_000  # most due occurrences one look at a schedule enumerates

FIRE_LUA = (lua("eventcore", "prelude", with_layout=True)
            + "local function ec_append(KEYS, ARGV)\n" + lua("eventcore", "append")
            + "\nend\n" + lua("eventcore", "schedule_fire"))
PUT_LUA = lua("eventcore", "schedule_put", with_layout=True)


# -- validation and cron arithmetic --------------------------------------------------------------
def _cronsim() -> Any:
    return import_optional("cronsim", None, "schedules", "eventcore.schedules")


def validate_schedule_id(schedule_id: object) -> str:
    """Schedule ids: 1-64 characters of ``[A-Za-z0-9._:-]``, starting alphanumeric."""
    if not isinstance(schedule_id, str) or not _SCHEDULE_ID.fullmatch(schedule_id):
        raise ValidationError(
            f"invalid schedule id {schedule_id!r:.80}: use 1-64 characters of A-Z a-z 0-9 . _ : -"
            " starting with a letter or digit")
    return schedule_id


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def validate_timezone(name: object) -> str:
    """An IANA timezone name (``Europe/Berlin``, ``UTC``); anything else is a
    :class:`ValidationError` naming it."""
    if (not isinstance(name, str) or len(name) > 64 or not _TZ_NAME.fullmatch(name)
            or name not in _available_zones()):
        raise ValidationError(f"unknown timezone {name!r:.80}: use an IANA name such as "
                              "'UTC' or 'Europe/Berlin'")
    try:
        _zone(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValidationError(f"unknown timezone {name!r:.80}: {exc}") from exc
    return name


@functools.cache
def _available_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


def validate_cron(expr: object) -> str:
    """A standard 5-field cron expression (minute hour day-of-month month day-of-week, with
    ``*``, lists, ranges, steps and names); anything else is a :class:`ValidationError` saying
    what is wrong. Expressions that can never fire (``0 0 30 2 *``) are refused too."""
    if not isinstance(expr, str):
        raise ValidationError(f"cron expression must be a string, got {type(expr).__name__}")
    if len(expr) > _MAX_CRON or not expr.isprintable():
        raise ValidationError(f"invalid cron expression {expr!r:.80}: too long or not "
                              "printable")
    fields = expr.split()
    if len(fields) != 5:
        raise ValidationError(
            f"invalid cron expression {expr!r:.80}: it has {len(fields)} fields; a standard "
            "expression has 5 (minute hour day-of-month month day-of-week)")
    cronsim = _cronsim()
    try:
        it = cronsim.CronSim(" ".join(fields), _dt.datetime(2000, 1, 1, tzinfo=_dt.UTC))
        next(it)
    except (cronsim.CronSimError, ValueError, IndexError, KeyError, TypeError,
            StopIteration, OverflowError) as exc:
        raise ValidationError(f"invalid cron expression {expr!r:.80}: {exc}") from exc
    return " ".join(fields)


def _dt_ms(value: _dt.datetime) -> int:
    return int(value.timestamp() * 1000)


def ms_utc(ms: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC)


def next_after(cron: str, tz: str, after_ms: int) -> int:
    """The first occurrence strictly after ``after_ms`` (epoch ms), in epoch ms."""
    start = _dt.datetime.fromtimestamp(after_ms / 1000, _zone(tz))
    return _dt_ms(next(iter(_cronsim().CronSim(cron, start))))


def due_between(cron: str, tz: str, first_ms: int, now_ms: int, limit: int = _SCAN_LIMIT
                ) -> list[int]:
    """The occurrences in ``[first_ms, now_ms]``, newest first, at most ``limit``."""
    start = _dt.datetime.fromtimestamp((now_ms + 1) / 1000, _zone(tz))
    out: list[int] = []
    for when in _cronsim().CronSim(cron, start, reverse=True):
        ms = _dt_ms(when)
        if ms < first_ms or len(out) >= limit:
            break
        out.append(ms)
    return out


def occurrence_session_id(keys: Keys, schedule_id: str, occurrence_ms: int) -> str:
    """The id of the session an occurrence starts: ``sch.<schedule id>.<UTC time>``, with the
    smallest suffix ``.<n>`` that puts it on the schedule's shard (so the schedule and the
    session share one cluster slot). Deterministic: the same occurrence always gets it."""
    stamp = ms_utc(occurrence_ms).strftime("%Y%m%dT%H%M%SZ")
    base = f"sch.{schedule_id}.{stamp}"
    want = keys.schedule_shard(schedule_id)
    if keys.shard_of(base) == want:
        return base
    n = 1
    while keys.shard_of(f"{base}.{n}") != want:
        n += 1
    return f"{base}.{n}"


# -- the stored schedule --------------------------------------------------------------------------
class _Definition(msgspec.Struct, frozen=True, kw_only=True):
    cron: str
    timezone: str
    agent: str
    input: Any = None
    labels: dict[str, str] = {}
    ttl_s: int | None = None
    catchup: CatchUp = "once"
    created_at_ms: int = 0


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule as stored: its definition and where its firing stands. Times are UTC;
    ``next_run_at`` is None while disabled. ``fired`` counts the sessions it started,
    ``skipped`` the occurrences the catch-up policy skipped."""

    schedule_id: str
    cron: str
    timezone: str
    agent: str
    input: Any = None
    labels: dict[str, str] = {}
    ttl_s: int | None = None
    catchup: CatchUp = "once"
    enabled: bool = True
    next_run_at: _dt.datetime | None = None
    last_run_at: _dt.datetime | None = None
    last_session_id: str | None = None
    fired: int = 0
    skipped: int = 0
    revision: int = 1
    created_at: _dt.datetime | None = None
    updated_at: _dt.datetime | None = None


class _State(msgspec.Struct, frozen=True):
    definition: _Definition
    revision: str
    enabled: bool
    next_ms: int | None
    last_run_ms: int | None
    last_session: str | None
    fired: int
    skipped: int
    updated_ms: int | None


_DEF_DECODER = msgspec.json.Decoder(_Definition)


def _decode_state(schedule_id: str, raw: Mapping[bytes, bytes]) -> _State:
    def text(field: str) -> str | None:
        value = raw.get(field.encode())
        return None if value is None else value.decode()

    def num(field: str) -> int | None:
        value = text(field)
        return int(value) if value else None

    try:
        definition = _DEF_DECODER.decode(raw[L.SCHEDULE_DEFINITION.encode()])
        return _State(definition, text(L.SCHEDULE_REVISION) or "0",
                      text(L.SCHEDULE_ENABLED) == "1", num(L.SCHEDULE_NEXT),
                      num(L.SCHEDULE_LAST_RUN), text(L.SCHEDULE_LAST_SESSION) or None,
                      num(L.SCHEDULE_FIRED) or 0, num(L.SCHEDULE_SKIPPED) or 0,
                      num(L.SCHEDULE_UPDATED_AT))
    except (KeyError, ValueError, msgspec.DecodeError) as exc:
        raise CorruptEntry(f"schedule {schedule_id!r} does not hold a schedule: {exc}") from exc


def _public(schedule_id: str, st: _State) -> Schedule:
    d = st.definition
    return Schedule(
        schedule_id=schedule_id, cron=d.cron, timezone=d.timezone, agent=d.agent,
        input=d.input, labels=d.labels, ttl_s=d.ttl_s, catchup=d.catchup, enabled=st.enabled,
        next_run_at=None if st.next_ms is None else ms_utc(st.next_ms),
        last_run_at=None if st.last_run_ms is None else ms_utc(st.last_run_ms),
        last_session_id=st.last_session, fired=st.fired, skipped=st.skipped,
        revision=int(st.revision),
        created_at=ms_utc(d.created_at_ms) if d.created_at_ms else None,
        updated_at=None if st.updated_ms is None else ms_utc(st.updated_ms),
    )


_UNSET: Any = object()


class Schedules:
    """Create, read, change and delete schedules (``now``: the clock, epoch seconds, which
    the first ``next_run_at`` is computed from)."""

    def __init__(self, log: EventLog, *, now: Callable[[], float] = time.time) -> None:
        self._log = log
        self._keys = log.keys
        self._now = now
        self._put = log.redis.register_script(PUT_LUA)

    def _now_ms(self) -> int:
        return int(self._now() * 1000)

    def _definition(self, *, cron: object, timezone: object, agent: object, input: Any,
                    labels: Mapping[str, str] | None, ttl_s: int | None, catchup: object,
                    created_at_ms: int) -> _Definition:
        cron = validate_cron(cron)
        timezone = validate_timezone(timezone)
        if catchup not in CATCHUP_POLICIES:
            raise ValidationError(f"catchup must be one of {', '.join(CATCHUP_POLICIES)}, got "
                                  f"{catchup!r:.40}")
        if not isinstance(agent, str):
            raise ValidationError("a schedule needs an agent (a string)")
        labels = dict(labels or {})
        # the same checks as the sessions it will create (agent, labels, input, ttl)
        self._log.prepare_session(agent, session_id="sch.check", labels=labels, input=input,
                                  ttl_s=ttl_s)
        return _Definition(cron=cron, timezone=timezone, agent=agent, input=input,
                           labels=labels, ttl_s=ttl_s, catchup=catchup,
                           created_at_ms=created_at_ms)

    async def create(
        self,
        schedule_id: str,
        *,
        cron: str,
        agent: str,
        timezone: str = "UTC",
        input: Any = None,
        labels: Mapping[str, str] | None = None,
        ttl_s: int | None = None,
        catchup: CatchUp = "once",
        enabled: bool = True,
    ) -> tuple[Schedule, bool]:
        """Create a schedule; returns it and whether it was created. The same id with the same
        definition returns the existing schedule (``False``); with another definition it is
        :class:`ScheduleConflict`."""
        validate_schedule_id(schedule_id)
        now = self._now_ms()
        d = self._definition(cron=cron, timezone=timezone, agent=agent, input=input,
                             labels=labels, ttl_s=ttl_s, catchup=catchup, created_at_ms=now)
        nxt = next_after(d.cron, d.timezone, now) if enabled else None
        got = await self._call("create", schedule_id, d, enabled, nxt, now)
        if got[0] != 1:
            existing = _DEF_DECODER.decode(got[1])
            if msgspec.structs.replace(existing, created_at_ms=0) != msgspec.structs.replace(
                    d, created_at_ms=0):
                raise ScheduleConflict(f"schedule {schedule_id!r} exists with another "
                                       "definition")
            return await self.get(schedule_id), False
        return await self.get(schedule_id), True

    async def _call(self, op: str, schedule_id: str, d: _Definition | None = None,
                    enabled: bool = True, nxt: int | None = None, now: int = 0,
                    rev: str = "") -> list[Any]:
        keys = [self._keys.schedule(schedule_id),
                self._keys.schedules(self._keys.schedule_shard(schedule_id))]
        args: list[Any] = [op, schedule_id]
        if d is not None:
            args += [msgspec.json.encode(d), "1" if enabled else "0",
                     "" if nxt is None else nxt, now, rev]
        with redis_errors(f"schedule {op}"):
            got, confirmed = await self._log.appender.replicated.run(self._put, keys, args)
        # a change of a schedule is acknowledged only once replicated, as appends are
        self._log.appender.replicated.check(confirmed, what=f"schedule {op}")
        return cast(list[Any], got)

    async def _state(self, schedule_id: str) -> _State:
        validate_schedule_id(schedule_id)
        with redis_errors("get schedule"):
            raw = await self._log.redis.hgetall(self._keys.schedule(schedule_id))  # type: ignore[misc]
        if not raw:
            raise ScheduleNotFound(schedule_id)
        return _decode_state(schedule_id, raw)

    async def get(self, schedule_id: str) -> Schedule:
        """The schedule (:class:`ScheduleNotFound` when there is none)."""
        return _public(schedule_id, await self._state(schedule_id))

    async def list(self) -> list[Schedule]:
        """Every schedule, ordered by id."""
        redis = self._log.redis
        with redis_errors("list schedules"):
            async with redis.pipeline(transaction=False) as pipe:
                for shard in self._keys.all_shards():
                    pipe.zrange(self._keys.schedules(shard), 0, -1)
                ids = sorted(i.decode() for got in await pipe.execute() for i in got)
            async with redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(self._keys.schedule(sid))
                raws = await pipe.execute()
        return [_public(sid, _decode_state(sid, raw)) for sid, raw in zip(ids, raws, strict=True)
                if raw]

    async def update(
        self,
        schedule_id: str,
        *,
        cron: str = _UNSET,
        agent: str = _UNSET,
        timezone: str = _UNSET,
        input: Any = _UNSET,
        labels: Mapping[str, str] = _UNSET,
        ttl_s: int | None = _UNSET,
        catchup: CatchUp = _UNSET,
        enabled: bool = _UNSET,
    ) -> Schedule:
        """Change a schedule. A change of the expression or timezone, and enabling it again,
        compute ``next_run_at`` afresh from now (occurrences while it was disabled are not
        caught up); a process firing the old definition at that moment finds the revision moved
        and fires nothing."""
        for _ in range(20):
            st = await self._state(schedule_id)
            d = st.definition
            changes = {k: v for k, v in {"cron": cron, "agent": agent, "timezone": timezone,
                                         "input": input, "labels": labels, "ttl_s": ttl_s,
                                         "catchup": catchup}.items() if v is not _UNSET}
            merged = {**msgspec.structs.asdict(d), **changes}
            nd = self._definition(**merged)
            now_enabled = st.enabled if enabled is _UNSET else bool(enabled)
            if not isinstance(now_enabled, bool):
                raise ValidationError("enabled must be true or false")
            now = self._now_ms()
            if not now_enabled:
                nxt = None
            elif (st.enabled and st.next_ms is not None and nd.cron == d.cron
                  and nd.timezone == d.timezone):
                nxt = st.next_ms
            else:
                nxt = next_after(nd.cron, nd.timezone, now)
            got = await self._call("update", schedule_id, nd, now_enabled, nxt, now,
                                   st.revision)
            if got[0] == -1:
                raise ScheduleNotFound(schedule_id)
            if got[0] == 1:
                return await self.get(schedule_id)
        raise ScheduleConflict(f"schedule {schedule_id!r} kept changing; try again")

    async def enable(self, schedule_id: str) -> Schedule:
        return await self.update(schedule_id, enabled=True)

    async def disable(self, schedule_id: str) -> Schedule:
        return await self.update(schedule_id, enabled=False)

    async def delete(self, schedule_id: str) -> None:
        """Delete a schedule (:class:`ScheduleNotFound` when there is none). The sessions it
        started stay."""
        validate_schedule_id(schedule_id)
        got = await self._call("delete", schedule_id)
        if got[0] != 1:
            raise ScheduleNotFound(schedule_id)


# -- firing --------------------------------------------------------------------------------------
class Scheduler(Running):
    """Fires due schedules; run it in as many processes as you like (each occurrence fires
    once). An async context manager (running for as long as it is entered), or call
    :meth:`tick` yourself (a burst: fire what is due now, return how many sessions started).

    - ``now``: the clock (epoch seconds); tests drive it.
    - ``interval_s``: how often the due schedules are looked for.
    - ``grace_s``: an occurrence found due later than this is *missed* (catch-up policy).
    - ``catchup_max``: most missed occurrences one look starts sessions for (policy ``all``).
    - ``batch``: most due schedules taken per shard and look; ``concurrency``: schedules read
      in one round trip and fired at once (the occurrences of one schedule always in order).
    """

    def __init__(
        self,
        log: EventLog,
        *,
        now: Callable[[], float] = time.time,
        interval_s: float | None = None,
        grace_s: float | None = None,
        catchup_max: int | None = None,
        batch: int = 100,
        concurrency: int = 32,
    ) -> None:
        s = log.settings
        self._log = log
        self._keys = log.keys
        self._now = now
        self.interval_s = s.schedule_interval_s if interval_s is None else interval_s
        self.grace_ms = int(1000 * (s.schedule_grace_s if grace_s is None else grace_s))
        self.catchup_max = s.schedule_catchup_max if catchup_max is None else catchup_max
        self._batch = batch
        self._concurrency = concurrency
        self._fire = log.redis.register_script(FIRE_LUA)
        self._stop = anyio.Event()
        self.fired = 0  # sessions this scheduler started
        self.lost = 0  # fires another process (or a change of the schedule) got to first
        self.failures = 0  # looks that failed (Redis unavailable past the retry budget)

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not self._stop.is_set():
            try:
                await self.tick()
            except RedisError as exc:  # Redis down or failing over: look again next time
                self.failures += 1
                logger.warning("scheduler: %s", exc)
            except EventcoreError as exc:
                self.failures += 1
                logger.error("scheduler: %s", exc)
            with anyio.move_on_after(self.interval_s):
                await self._stop.wait()

    async def aclose(self) -> None:
        self._stop.set()

    async def tick(self) -> int:
        """Fire every occurrence due now; the number of sessions started by this process."""
        now_ms = int(self._now() * 1000)
        redis = self._log.redis
        with redis_errors("due schedules"):
            async with redis.pipeline(transaction=False) as pipe:
                for shard in self._keys.all_shards():
                    pipe.zrangebyscore(self._keys.schedules(shard), "-inf", now_ms, start=0,
                                       num=self._batch)
                due = [i.decode() for got in await pipe.execute() for i in got]
        random.shuffle(due)  # racing schedulers start on different ones
        started = 0
        down: list[RedisError] = []

        async def fire(schedule_id: str, raw: Mapping[bytes, bytes]) -> None:
            nonlocal started
            try:
                n = await self._fire_due(schedule_id, raw, now_ms)
                started += n  # not `started += await ...`: that reads before awaiting
            except (CorruptEntry, ValidationError) as exc:  # this schedule's problem
                logger.error("scheduler: schedule %r: %s", schedule_id, exc)
            except RedisError as exc:  # everyone's: ends the look after this chunk
                down.append(exc)

        for at in range(0, len(due), self._concurrency):
            chunk = due[at:at + self._concurrency]
            with redis_errors("read schedules"):  # one round trip for a chunk's states
                async with redis.pipeline(transaction=False) as pipe:
                    for schedule_id in chunk:
                        pipe.hgetall(self._keys.schedule(schedule_id))
                    raws = await pipe.execute()
            async with anyio.create_task_group() as tg:
                for schedule_id, raw in zip(chunk, raws, strict=True):
                    if raw:
                        tg.start_soon(fire, schedule_id, raw)
            if down:
                self.fired += started
                raise down[0]
        self.fired += started
        return started

    def plan(self, d: _Definition, next_ms: int, now_ms: int
             ) -> list[tuple[int | None, int, int]]:
        """The steps that bring a schedule whose next occurrence is ``next_ms`` up to
        ``now_ms``: (occurrence to fire or None, the new next occurrence, occurrences
        skipped), oldest first."""
        due = due_between(d.cron, d.timezone, next_ms, now_ms)[::-1]  # oldest first
        if not due:
            return []
        upcoming = next_after(d.cron, d.timezone, now_ms)
        late = [o for o in due if now_ms - o > self.grace_ms]
        recent = due[len(late):]
        keep = {"all": late[-self.catchup_max:] if self.catchup_max > 0 else [],
                "once": late[-1:], "skip": []}[d.catchup]
        fire = keep + recent
        steps: list[tuple[int | None, int, int]] = []
        index = {o: i for i, o in enumerate(due)}
        prev = -1  # index in due of the last occurrence accounted for
        for o in fire:
            i = index[o]
            after = due[i + 1] if i + 1 < len(due) else upcoming
            steps.append((o, after, i - prev - 1))
            prev = i
        if prev < len(due) - 1:  # the newest due ones are skipped: move next past them
            steps.append((None, upcoming, len(due) - 1 - prev))
        if due[0] != next_ms:  # more were due than one look enumerates: skipped too
            head = steps[0]
            steps[0] = (head[0], head[1], head[2] + 1)
        return steps

    async def _fire_due(self, schedule_id: str, raw: Mapping[bytes, bytes], now_ms: int
                        ) -> int:
        st = _decode_state(schedule_id, raw)
        if not st.enabled or st.next_ms is None or st.next_ms > now_ms:
            return 0
        expected = st.next_ms
        started = 0
        for occurrence, after, skipped in self.plan(st.definition, expected, now_ms):
            done = await self._step(schedule_id, st, expected, occurrence, after, skipped)
            if done is None:
                self.lost += 1
                break
            started += done
            expected = after
        return started

    async def _step(self, schedule_id: str, st: _State, expected: int, occurrence: int | None,
                    after: int, skipped: int) -> int | None:
        """One step of a plan: 1 a session started, 0 moved on without one (skipped, or the
        occurrence's session existed already), None the schedule was not where it was read."""
        keys = self._keys
        shard = keys.schedule_shard(schedule_id)
        kk: list[Any] = [keys.schedule(schedule_id), keys.schedules(shard)]
        session_id = ""
        first = None
        aa: list[Any] = []
        blobs: dict[str, bytes] = {}
        if occurrence is not None:
            d = st.definition
            session_id = occurrence_session_id(keys, schedule_id, occurrence)
            labels = {**d.labels, "schedule": schedule_id,
                      "occurrence": ms_utc(occurrence).isoformat().replace("+00:00", "Z")}
            items, _ = self._log.prepare_session(d.agent, session_id=session_id, labels=labels,
                                                 input=d.input, ttl_s=d.ttl_s)
            first = items[0]
            token = f"sch{os.urandom(9).hex()}"
            akeys, aa, blobs = self._log.appender.script_call(items, token)
            kk += akeys
        args: list[Any] = [schedule_id, expected, st.revision,
                           "" if occurrence is None else occurrence, after, session_id,
                           skipped, *aa]
        with redis_errors("fire schedule"):
            if blobs:
                async with self._log.redis.pipeline(transaction=False) as pipe:
                    for key, data in blobs.items():
                        pipe.set(key, data, nx=True)
                    await pipe.execute()
            # routed by the schedule's hash; with EVENTCORE_APPEND_REPLICAS, WAIT after it
            got, confirmed = await self._log.appender.replicated.run(self._fire, kk, args)
        if got[0] == 0:
            return None
        if got[0] == 2:
            assert first is not None
            err = _result(first, got[1])
            raise CorruptEntry(f"could not start session {session_id!r}: {err}")
        if len(got) > 2:  # the append ran: its answer ends with the shard's write counter
            self._log.appender.observe_writes(keys.schedule_shard(schedule_id), got[2])
        # a fire (the schedule moved on, its session created) counts only once replicated; if
        # not, the next look finds it moved on the master (lost race) or, after a failover that
        # lost it, due again: fired then (same session id), so it is never fired twice
        self._log.appender.replicated.check(confirmed, what="schedule fire")
        if occurrence is None or got[1] == -1:  # -1: the append found the session there
            return 0
        logger.info("schedule %r fired %s: session %s", schedule_id,
                    ms_utc(occurrence).isoformat(), session_id)
        return 1


def scheduler_for(log: EventLog) -> Any:
    """The scheduler a service process runs (``eventcore serve`` and ``eventcore worker``): a
    :class:`Scheduler`, or a context manager doing nothing when ``EVENTCORE_SCHEDULES=false``
    or the ``schedules`` extra is not installed."""
    import contextlib

    from ._extras import has_extra

    if not log.settings.schedules or not has_extra("schedules"):
        return contextlib.nullcontext()
    return Scheduler(log)


def iter_occurrences(cron: str, tz: str, after: _dt.datetime) -> Iterator[_dt.datetime]:
    """The occurrences of ``cron`` in ``tz`` after ``after`` (aware), in local time."""
    cron, tz = validate_cron(cron), validate_timezone(tz)
    start = after.astimezone(_zone(tz))
    yield from _cronsim().CronSim(cron, start)
