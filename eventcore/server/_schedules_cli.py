"""``eventcore schedules ...``: manage cron schedules in the Redis of ``EVENTCORE_REDIS_URL``
(registered on the eventcore CLI)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
import msgspec
import typer

from eventcore import EventLog, load_settings
from eventcore.errors import EventcoreError

__all__ = ["schedules_app"]

T = TypeVar("T")

schedules_app = typer.Typer(help="Cron schedules that start sessions (exactly once per "
                            "occurrence, whatever the number of serve/worker processes).",
                            no_args_is_help=True)


def _run(call: Callable[[Any], Awaitable[T]]) -> T:
    from eventcore.schedules import Schedules

    async def main() -> T:
        async with EventLog(load_settings()) as log:
            return await call(Schedules(log))

    try:
        return anyio.run(main)
    except EventcoreError as exc:
        typer.echo(f"eventcore schedules: error: {exc}", err=True)
        raise typer.Exit(1) from None


def _show(schedule: Any) -> None:
    raw = msgspec.to_builtins(schedule)
    raw["id"] = raw.pop("schedule_id")
    typer.echo(json.dumps(raw, indent=2))


@schedules_app.command("list")
def list_schedules(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every schedule: id, expression, timezone, state, next occurrence (UTC)."""
    for s in _run(lambda store: store.list()):
        if as_json:
            raw = msgspec.to_builtins(s)
            raw["id"] = raw.pop("schedule_id")
            typer.echo(json.dumps(raw))
        else:
            nxt = s.next_run_at.isoformat() if s.next_run_at else "-"
            state = "enabled" if s.enabled else "disabled"
            typer.echo(f"{s.schedule_id}\t{s.cron}\t{s.timezone}\t{state}\t{nxt}\t{s.agent}")


@schedules_app.command("create")
def create(
    schedule_id: Annotated[str, typer.Argument(metavar="ID", help="Your id for it.")],
    cron: Annotated[str, typer.Argument(help="5-field cron expression, quoted.")],
    agent: Annotated[str, typer.Option(help="The agent of the sessions it starts.")],
    timezone: Annotated[str, typer.Option(help="IANA timezone.")] = "UTC",
    input_json: Annotated[str | None, typer.Option(
        "--input", help="First input of each session (JSON).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    catchup: Annotated[str, typer.Option(help="once, all or skip.")] = "once",
    disabled: Annotated[bool, typer.Option("--disabled", help="Create it disabled.")] = False,
) -> None:
    """Create a schedule (the same id and definition again is a no-op)."""
    try:
        value = None if input_json is None else json.loads(input_json)
    except json.JSONDecodeError as exc:
        typer.echo(f"eventcore schedules: error: --input is not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, val = item.partition("=")
        if not sep:
            typer.echo(f"eventcore schedules: error: --label {item!r} is not key=value",
                       err=True)
            raise typer.Exit(2)
        labels[key] = val
    made, _ = _run(lambda store: store.create(
        schedule_id, cron=cron, agent=agent, timezone=timezone, input=value, labels=labels,
        catchup=catchup, enabled=not disabled))
    _show(made)


@schedules_app.command("show")
def show(schedule_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """One schedule, as JSON."""
    _show(_run(lambda store: store.get(schedule_id)))


@schedules_app.command("enable")
def enable(schedule_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Enable a schedule (its next occurrence is computed from now)."""
    _show(_run(lambda store: store.enable(schedule_id)))


@schedules_app.command("disable")
def disable(schedule_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Disable a schedule (nothing fires until it is enabled again)."""
    _show(_run(lambda store: store.disable(schedule_id)))


@schedules_app.command("delete")
def delete(schedule_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a schedule (the sessions it started stay)."""
    _run(lambda store: store.delete(schedule_id))
    typer.echo(f"deleted {schedule_id}")
