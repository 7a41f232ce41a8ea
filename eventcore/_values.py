"""What a client-supplied value may be: the one rule for every value that is stored and read back.

Input payloads, signal values, a new session's input and labels travel as JSON to every reader
of the log: the SSE hub, the projector (whose read model nests a signal value three levels
deeper), ``GET /v1/sessions/{id}`` (serialized again by pydantic, which refuses documents
nested past about 250), browsers' ``JSON.parse``, PostgreSQL. A value is accepted only when all
of them can take it back unchanged (I-JSON, RFC 7493, plus a depth limit):

- nested at most :data:`MAX_DEPTH` containers deep;
- every string (object keys too) valid Unicode: no lone surrogates, which UTF-8 cannot carry;
- numbers finite (``NaN``/``Infinity`` are not JSON: they were silently stored as ``null``);
- integers within +-(2**53 - 1), what a JSON reader holds exactly.

The walk is iterative, so a hostile value cannot exhaust the stack while it is checked.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgspec

from .errors import ValidationError

__all__ = ["MAX_DEPTH", "MAX_SAFE_INT", "validate_value", "value_problem"]

MAX_DEPTH: Final = 64
MAX_SAFE_INT: Final = 2**53 - 1

_SCALARS = (bool, type(None))


def _text_problem(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a string is not valid Unicode (it holds a lone surrogate)"
    return None


def value_problem(value: Any) -> str | None:
    """Why ``value`` may not be stored, or None if it may."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            problem = _text_problem(item)
        elif isinstance(item, _SCALARS):
            continue
        elif isinstance(item, int):
            problem = None if -MAX_SAFE_INT <= item <= MAX_SAFE_INT else (
                "an integer is outside +-(2**53 - 1), what JSON readers hold exactly")
        elif isinstance(item, float):
            problem = None if math.isfinite(item) else "a number is not finite (NaN/Infinity)"
        elif isinstance(item, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                return f"the value is nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str):
                        if (problem := _text_problem(key)) is not None:
                            return problem
                    elif type(key) is not int:  # msgspec writes int keys as strings
                        return "object keys must be strings"
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
            continue
        else:  # Structs, bytes, datetimes...: checked as the JSON they are encoded to
            try:
                stack.append((msgspec.to_builtins(item), depth))
            except (TypeError, ValueError, RecursionError):
                return f"{type(item).__name__!r} is not JSON-encodable"
            continue
        if problem is not None:
            return problem
    return None


def validate_value(value: Any, what: str = "value") -> Any:
    """``value`` itself, or :class:`ValidationError` saying why it may not be stored."""
    problem = value_problem(value)
    if problem is not None:
        raise ValidationError(f"{what}: {problem}")
    return value
