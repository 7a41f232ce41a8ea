"""Optional parts and the extras that install them: one place that says which is which."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Final

from .errors import MissingExtra

__all__ = ["EXTRAS", "has_extra", "import_optional", "require_extra"]

# extra -> the importable modules it provides (what the extra's requirements install)
EXTRAS: Final[dict[str, tuple[str, ...]]] = {
    "server": ("fastapi", "uvicorn", "typer", "rich", "sse_starlette", "jwt", "httpx",
               "httpx_sse", "fastapi_offline", "watchfiles"),
    "webrtc": ("aiortc",),
    "sql": ("sqlalchemy", "aiosqlite"),
    "postgres": ("sqlalchemy", "asyncpg"),
    "schedules": ("cronsim",),
    "client": ("httpx",),
}


def _missing(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def has_extra(extra: str) -> bool:
    """Whether every module of ``extra`` is importable (nothing is imported)."""
    return not _missing(extra)


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` when one of its modules is not installed."""
    missing = _missing(extra)
    if missing:
        raise MissingExtra(
            f"{feature} needs the {extra!r} extra (missing: {', '.join(missing)}): "
            f"pip install 'eventcore[{extra}]'"
        )


def import_optional(module: str, package: str | None, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (relative to ``package``); a third-party module missing underneath
    becomes :class:`MissingExtra` naming ``extra``."""
    try:
        return importlib.import_module(module, package)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "eventcore":
            raise
        raise MissingExtra(
            f"{feature} needs the {extra!r} extra (missing: {exc.name}): "
            f"pip install 'eventcore[{extra}]'"
        ) from exc
