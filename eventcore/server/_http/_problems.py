"""Errors as RFC 9457 ``application/problem+json`` with a stable ``type`` per kind of failure.

Every rejection goes through :class:`Problem` (raise it anywhere) or one of the handlers below,
so clients can branch on ``type`` and never on the human-readable ``detail``. No handler echoes
request bodies, headers or tokens back.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from eventcore.errors import (
    AppendNotReplicated,
    EventcoreError,
    HistoryGone,
    PayloadTooLarge,
    RedisUnavailable,
    SessionEnded,
    SessionNotFound,
    ValidationError,
)

__all__ = ["PROBLEM_JSON", "Problem", "ProblemModel", "install_problem_handlers",
           "problem_response", "problem_type"]

logger = logging.getLogger("eventcore.server")

PROBLEM_JSON = "application/problem+json"
_PREFIX = "urn:eventcore:problem:"

_TITLES = {
    "malformed-json": "The request body is not valid JSON",
    "validation-error": "The request is not valid",
    "unknown-agent": "No such agent",
    "unauthorized": "Missing or invalid credentials",
    "token-expired": "The token has expired",
    "forbidden": "These credentials do not allow this",
    "not-found": "No such resource",
    "session-not-found": "No such session",
    "session-ended": "The session has ended",
    "method-not-allowed": "Method not allowed",
    "cors-refused": "This cross-origin request is not allowed",
    "payload-too-large": "The request body is too large",
    "headers-too-large": "The request headers are too large",
    "history-gone": "The requested history is no longer available",
    "unavailable": "A backend is unavailable; retry later",
    "overloaded": "The server is at capacity; retry later",
    "shutting-down": "The server is shutting down; retry later",
    "http-error": "The request failed",
    "internal": "Internal server error",
}


def problem_type(slug: str) -> str:
    return _PREFIX + slug


class ProblemModel(pydantic.BaseModel):
    """The documented shape of every error response."""

    type: str = pydantic.Field(examples=[problem_type("session-not-found")])
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
    first_available: int | None = None


class Problem(EventcoreError):
    """Raise to answer with a problem document."""

    def __init__(
        self, status: int, slug: str, detail: str | None = None, *,
        headers: dict[str, str] | None = None, **extra: Any,
    ) -> None:
        super().__init__(detail or slug)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem_response(
    status: int, slug: str, detail: str | None = None, *, instance: str | None = None,
    headers: dict[str, str] | None = None, **extra: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": problem_type(slug), "title": _TITLES.get(slug, slug), "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return Response(msgspec.json.encode(body), status_code=status, media_type=PROBLEM_JSON,
                    headers=headers)


def _path(request: Request) -> str:
    return str(request.url.path)


def _validation_errors(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    slug = "validation-error"
    errors = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            slug = "malformed-json"
        # location and message only: never the offending input (it may be huge or secret)
        errors.append({"loc": [str(p) for p in err.get("loc", ())][:8],
                       "msg": str(err.get("msg", ""))[:300], "type": str(err.get("type", ""))})
    return slug, errors[:20]


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return problem_response(exc.status, exc.slug, exc.detail, instance=_path(request),
                                headers=exc.headers, **exc.extra)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        slug, errors = _validation_errors(exc)
        status = 400 if slug == "malformed-json" else 422
        return problem_response(status, slug, "see errors", instance=_path(request),
                                errors=errors)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large",
                400: "malformed-json", 401: "unauthorized", 403: "forbidden"}.get(
                    exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else None
        return problem_response(exc.status_code, slug, detail, instance=_path(request),
                                headers=dict(exc.headers or {}))

    async def on_eventcore(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EventcoreError)
        p = _from_eventcore(exc)
        return problem_response(p.status, p.slug, p.detail, instance=_path(request),
                                headers=p.headers, **p.extra)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, _path(request))
        return problem_response(500, "internal", instance=_path(request))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(EventcoreError, on_eventcore)
    app.add_exception_handler(Exception, on_unexpected)


def _from_eventcore(exc: EventcoreError) -> Problem:
    if isinstance(exc, SessionNotFound):
        return Problem(404, "session-not-found", f"session {exc.session_id!r} does not exist")
    if isinstance(exc, SessionEnded):
        return Problem(409, "session-ended", f"session {exc.session_id!r} has ended")
    if isinstance(exc, PayloadTooLarge):
        return Problem(413, "payload-too-large", str(exc))
    if isinstance(exc, ValidationError):
        return Problem(422, "validation-error", str(exc)[:500])
    if isinstance(exc, HistoryGone):
        return Problem(410, "history-gone", str(exc), first_available=exc.first_available)
    if isinstance(exc, AppendNotReplicated):
        return Problem(503, "not-replicated", str(exc)[:300], headers={"Retry-After": "1"})
    if isinstance(exc, RedisUnavailable):
        return Problem(503, "unavailable", "Redis is unavailable", headers={"Retry-After": "1"})
    if type(exc).__name__ == "Overloaded":
        return Problem(503, "overloaded", str(exc)[:300], headers={"Retry-After": "1"})
    logger.error("eventcore error: %s", exc)
    return Problem(500, "internal")
