"""``/v1/schedules``: cron schedules that start sessions (admin only), and the scheduler a
service process runs (:mod:`eventcore._schedules`)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
import pydantic
from fastapi import APIRouter, Depends
from starlette.responses import Response

from eventcore._extras import require_extra
from eventcore._schedules import (
    Schedule,
    ScheduleConflict,
    ScheduleNotFound,
    Schedules,
    scheduler_for,
)

from ._auth import Principal
from ._context import ServiceContext, get_context, require_admin
from ._problems import Problem

__all__ = ["router", "scheduler_service"]

router = APIRouter(prefix="/v1", tags=["schedules"])

Ctx = Annotated[ServiceContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require_admin)]


class ScheduleIn(pydantic.BaseModel):
    """A schedule to create. ``id`` is yours: creating the same id with the same definition
    again returns the existing schedule (200); with another definition it is 409."""

    model_config = pydantic.ConfigDict(extra="forbid")

    id: str = pydantic.Field(description="1-64 characters of A-Z a-z 0-9 . _ : -")
    cron: str = pydantic.Field(description="Standard 5-field cron expression",
                               examples=["0 9 * * 1-5"])
    timezone: str = pydantic.Field(default="UTC", description="IANA timezone the expression "
                                   "is read in", examples=["Europe/Berlin"])
    agent: str
    input: Any = pydantic.Field(default=None, description="First input of each session")
    labels: dict[str, str] = pydantic.Field(default_factory=dict)
    ttl_s: int | None = pydantic.Field(default=None, ge=0)
    catchup: Literal["once", "all", "skip"] = pydantic.Field(
        default="once", description="Occurrences missed while no scheduler ran: one session "
        "for the latest (once), one per occurrence, bounded (all), or none (skip)")
    enabled: bool = True


class SchedulePatch(pydantic.BaseModel):
    """The fields to change; the others stay."""

    model_config = pydantic.ConfigDict(extra="forbid")

    cron: str | None = None
    timezone: str | None = None
    agent: str | None = None
    input: Any = None
    labels: dict[str, str] | None = None
    ttl_s: int | None = pydantic.Field(default=None, ge=0)
    catchup: Literal["once", "all", "skip"] | None = None
    enabled: bool | None = None


class ScheduleOut(pydantic.BaseModel):
    id: str
    cron: str
    timezone: str
    agent: str
    input: Any = None
    labels: dict[str, str]
    ttl_s: int | None
    catchup: str
    enabled: bool
    next_run_at: dt.datetime | None
    last_run_at: dt.datetime | None
    last_session_id: str | None
    fired: int
    skipped: int
    revision: int
    created_at: dt.datetime | None
    updated_at: dt.datetime | None


class SchedulesOut(pydantic.BaseModel):
    schedules: list[ScheduleOut]


def _out(s: Schedule) -> dict[str, Any]:
    raw = msgspec.to_builtins(s)
    raw["id"] = raw.pop("schedule_id")
    return dict(raw)


def _json(value: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status_code=status,
                    media_type="application/json")


def _store(ctx: ServiceContext) -> Schedules:
    store = ctx.extras.get("schedules")
    if store is None:
        require_extra("schedules", "/v1/schedules")
        store = ctx.extras["schedules"] = Schedules(ctx.log)
    assert isinstance(store, Schedules)
    return store


def _check_agent(ctx: ServiceContext, agent: str | None) -> None:
    if agent is not None and ctx.agents is not None and agent not in ctx.agents:
        raise Problem(422, "unknown-agent", f"no agent named {agent!r} is registered")


@contextlib.contextmanager
def _problems(schedule_id: str | None = None) -> Any:
    try:
        yield
    except ScheduleNotFound as exc:
        raise Problem(404, "schedule-not-found", str(exc)) from exc
    except ScheduleConflict as exc:
        raise Problem(409, "schedule-conflict", str(exc)) from exc


@router.post("/schedules", status_code=201, response_model=ScheduleOut,
             summary="Create a cron schedule (idempotent by id)")
async def create_schedule(body: ScheduleIn, _: Admin, ctx: Ctx) -> Response:
    _check_agent(ctx, body.agent)
    with _problems():
        made, created = await _store(ctx).create(
            body.id, cron=body.cron, agent=body.agent, timezone=body.timezone,
            input=body.input, labels=body.labels, ttl_s=body.ttl_s, catchup=body.catchup,
            enabled=body.enabled)
    return _json(_out(made), 201 if created else 200)


@router.get("/schedules", response_model=SchedulesOut, summary="Every schedule")
async def list_schedules(_: Admin, ctx: Ctx) -> Response:
    return _json({"schedules": [_out(s) for s in await _store(ctx).list()]})


@router.get("/schedules/{schedule_id}", response_model=ScheduleOut, summary="One schedule")
async def get_schedule(schedule_id: str, _: Admin, ctx: Ctx) -> Response:
    with _problems():
        return _json(_out(await _store(ctx).get(schedule_id)))


@router.patch("/schedules/{schedule_id}", response_model=ScheduleOut,
              summary="Change, enable or disable a schedule")
async def update_schedule(schedule_id: str, body: SchedulePatch, _: Admin, ctx: Ctx
                          ) -> Response:
    changes = body.model_dump(exclude_unset=True)
    for name in ("cron", "timezone", "agent", "labels", "catchup", "enabled"):
        if name in changes and changes[name] is None:
            raise Problem(422, "validation-error", f"{name} cannot be null")
    _check_agent(ctx, changes.get("agent"))
    with _problems():
        return _json(_out(await _store(ctx).update(schedule_id, **changes)))


@router.delete("/schedules/{schedule_id}", status_code=204, summary="Delete a schedule")
async def delete_schedule(schedule_id: str, _: Admin, ctx: Ctx) -> Response:
    with _problems():
        await _store(ctx).delete(schedule_id)
    return Response(status_code=204)


@contextlib.asynccontextmanager
async def scheduler_service(ctx: ServiceContext) -> AsyncIterator[None]:
    """The scheduler of an API process (a service factory of ``create_app``)."""
    async with scheduler_for(ctx.log):
        yield
