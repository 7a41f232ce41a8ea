"""Plugging sinks: by object, by dotted path, or by name from the ``eventcore.sinks`` entry points.

A third-party package registers a sink in its own ``pyproject.toml``::

    [project.entry-points."eventcore.sinks"]
    audit = "acme_audit.sink:AuditSink"

and ``load_sink("audit", **options)`` (or ``EVENTCORE_SINKS='["audit"]'``) builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import pydantic
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventcore._imports import import_object
from eventcore.errors import ConfigError

from ._base import Sink
from ._jsonl import JsonlSink
from ._memory import MemorySink

__all__ = ["ENTRY_POINT_GROUP", "SinkSpec", "configured_sinks", "load_sink"]

ENTRY_POINT_GROUP = "eventcore.sinks"
BUILTIN: Mapping[str, Any] = {"memory": MemorySink, "jsonl": JsonlSink}


def _is_sink(obj: object) -> bool:
    return not isinstance(obj, type) and isinstance(obj, Sink)


def _import(path: str) -> Any:
    """``pkg.mod:attr.sub`` or ``pkg.mod.attr``."""
    return import_object(path, "sink", dotted=True)


def _entry_point(name: str) -> Any:
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        known = sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise ConfigError(
            f"no sink named {name!r}; known: {', '.join(known) or 'none'} "
            f"(entry point group {ENTRY_POINT_GROUP!r}, or give 'package.module:attribute')"
        )
    ep = next(iter(found))
    try:
        return ep.load()
    except Exception as exc:
        raise ConfigError(f"sink {name!r} ({ep.value}) failed to load: {exc}") from exc


def load_sink(spec: object, **options: Any) -> Sink:
    """Build a sink from a sink object (returned as is), a class or factory (called with
    ``options``), a dotted path to one, a built-in name (``memory``, ``jsonl``) or the name of
    an ``eventcore.sinks`` entry point. Raises :class:`~eventcore.ConfigError` naming the
    problem."""
    if _is_sink(spec):
        if options:
            raise ConfigError("options are for sink classes and factories, not sink objects")
        return spec  # type: ignore[return-value]
    target: Any = spec
    if isinstance(spec, str):
        if spec in BUILTIN:
            target = BUILTIN[spec]
        elif ":" in spec or "." in spec:
            target = _import(spec)
        else:
            target = _entry_point(spec)
    if not _is_sink(target):
        if not callable(target):
            raise ConfigError(f"sink {spec!r} is neither a sink nor a class or factory of one")
        try:
            target = target(**options)
        except TypeError as exc:
            raise ConfigError(f"sink {spec!r} rejected its options {options!r}: {exc}") from exc
    if not _is_sink(target):
        raise ConfigError(
            f"sink {spec!r} built a {type(target).__name__}, which has no async send()/aclose()"
        )
    return target  # type: ignore[no-any-return]


class SinkSpec(pydantic.BaseModel):
    """One configured sink: what to load, its options, and where it runs."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    sink: str
    options: dict[str, Any] = pydantic.Field(default_factory=dict)
    mode: str = pydantic.Field(default="subscriber", pattern="^(inline|subscriber)$")


class _SinkSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVENTCORE_", extra="ignore")

    sinks: list[str | SinkSpec] = pydantic.Field(
        default_factory=list,
        description='JSON list: "name" or "pkg.mod:Class", or {"sink", "options", "mode"}.',
    )


_ITEMS = pydantic.TypeAdapter(list[str | SinkSpec])


def configured_sinks(raw: str | None = None) -> list[tuple[SinkSpec, Sink]]:
    """The sinks named by ``EVENTCORE_SINKS`` (or ``raw``, the same JSON), built."""
    try:
        items = _SinkSettings().sinks if raw is None else _ITEMS.validate_json(raw)
    except (pydantic.ValidationError, ValueError) as exc:
        raise ConfigError(f"invalid settings: EVENTCORE_SINKS: {exc}") from exc
    specs = [s if isinstance(s, SinkSpec) else SinkSpec(sink=s) for s in items]
    return [(s, load_sink(s.sink, **s.options)) for s in specs]
