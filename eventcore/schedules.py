"""Cron schedules that start sessions, exactly once per occurrence across any number of
scheduler processes (see :mod:`eventcore._schedules` and the README's "Schedules" section).
Needs the ``schedules`` extra (``pip install 'eventcore[schedules]'``)."""

from ._schedules import (
    CATCHUP_POLICIES,
    CatchUp,
    Schedule,
    ScheduleConflict,
    ScheduleNotFound,
    Scheduler,
    Schedules,
    iter_occurrences,
    occurrence_session_id,
    scheduler_for,
    validate_cron,
    validate_schedule_id,
    validate_timezone,
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
