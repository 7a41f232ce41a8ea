"""Numeric request parameters (cursors, page sizes): ASCII digits and nothing else.

``int()`` (and pydantic's lax int) also reads ``+1``, `` 1``, ``1_000``, ``1.0`` and digits of
other scripts (``١٢``), and ``str.isdigit()`` admits characters ``int()`` then refuses (``²``):
every seq a client sends goes through :func:`parse_digits`, so each of those is a 4xx.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from pydantic import BeforeValidator, Field

from eventcore.errors import ValidationError

__all__ = ["MAX_SEQ", "PageSize", "SeqParam", "parse_digits"]

MAX_SEQ: Final = 2**53
_MAX_DIGITS = len(str(MAX_SEQ))
_DIGITS = frozenset("0123456789")


def parse_digits(text: str, what: str, *, maximum: int = MAX_SEQ) -> int:
    """``text`` as an integer of ASCII digits up to ``maximum``, else ``ValidationError``."""
    if not 0 < len(text) <= _MAX_DIGITS or not _DIGITS.issuperset(text) \
            or int(text) > maximum:
        raise ValidationError(f"{what} must be ASCII digits, at most {maximum}")
    return int(text)


def _digits(what: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        return parse_digits(value, what) if isinstance(value, str) else value

    return BeforeValidator(check)


SeqParam = Annotated[int, _digits("a seq"), Field(ge=0, le=MAX_SEQ)]
"""A seq cursor in a query string (``after``, ``since_seq``)."""
PageSize = Annotated[int, _digits("a page size"), Field(ge=1, le=1000)]
