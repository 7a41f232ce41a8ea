"""The client's errors: HTTP answers and transport failures, converted at the boundary."""

from __future__ import annotations

from typing import Any

from eventcore.errors import EventcoreError, SessionEnded, SessionNotFound, ValidationError

__all__ = [
    "ApiError",
    "ClientError",
    "Conflict",
    "ConnectionLost",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "ServiceUnavailable",
    "Unauthorized",
]


class ClientError(EventcoreError):
    """Base of every error :mod:`eventcore.client` raises."""


class ConnectionLost(ClientError):
    """The service could not be reached (or kept dropping the connection) for longer than the
    client's ``reconnect_timeout_s``; the underlying httpx error is the ``__cause__``."""


class ApiError(ClientError):
    """The service answered with an error: ``status``, the problem document's ``type``
    (``problem``, e.g. ``"token-expired"``) and ``detail``."""

    def __init__(self, status: int, problem: str, detail: str,
                 body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.problem = problem
        self.detail = detail
        self.body = body or {}
        super().__init__(f"{status} {problem}: {detail}")


class Unauthorized(ApiError):
    """401: no valid credential (after the token-refresh hook, if any, was tried)."""


class Forbidden(ApiError):
    """403: the credential does not reach this session, or is read-only."""


class NotFound(ApiError, SessionNotFound):
    """404: the session (or the endpoint) does not exist."""

    def __init__(self, status: int, problem: str, detail: str,
                 body: dict[str, Any] | None = None) -> None:
        ApiError.__init__(self, status, problem, detail, body)


class Conflict(ApiError, SessionEnded):
    """409: the session has ended and takes no more events."""

    def __init__(self, status: int, problem: str, detail: str,
                 body: dict[str, Any] | None = None) -> None:
        ApiError.__init__(self, status, problem, detail, body)


class InvalidRequest(ApiError, ValidationError):
    """400 / 413 / 422: the request was refused as malformed."""


class ServiceUnavailable(ApiError):
    """503 / 429 (or another 5xx) that outlived the client's retries."""


def api_error(status: int, body: Any, reason: str = "") -> ApiError:
    """The typed error for an error answer (a problem document, or anything else)."""
    doc: dict[str, Any] = body if isinstance(body, dict) else {}
    problem = str(doc.get("type") or doc.get("title") or reason or "error")
    problem = problem.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    detail = str(doc.get("detail") or doc.get("title") or reason or f"HTTP {status}")
    cls: type[ApiError]
    if status == 401:
        cls = Unauthorized
    elif status == 403:
        cls = Forbidden
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status in (400, 413, 422):
        cls = InvalidRequest
    elif status == 429 or status >= 500:
        cls = ServiceUnavailable
    else:
        cls = ApiError
    return cls(status, problem, detail, doc)
