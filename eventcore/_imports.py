"""Import an object named by ``package.module:attribute`` (CLI ``APP`` arguments, sink paths)."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError

__all__ = ["import_object"]


def import_object(spec: str, what: str = "object", *, dotted: bool = False) -> Any:
    """``pkg.mod:attr.sub`` -> the object. ``dotted=True`` also accepts ``pkg.mod.attr``.

    Errors are :class:`ConfigError` naming ``what`` and ``spec``.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    elif dotted:
        module_name, _, attr = spec.rpartition(".")
    else:
        module_name, attr = spec, ""
    if not module_name or not attr:
        raise ConfigError(f"{what} {spec!r}: use 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(f"{what} {spec!r}: {module_name!r} has no {attr!r}") from exc
    return obj
