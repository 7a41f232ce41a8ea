"""CORS (``EVENTCORE_CORS_ORIGINS``): browser pages on other origins may call the API.

Credentials (cookies, HTTP auth) are never allowed: the API reads a bearer header that the page
sets itself (or ``?access_token=`` for ``EventSource``), so it needs none, and that is what makes
``*`` safe — with credentials, ``*`` would hand every site the user's session.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from ._problems import problem_response

__all__ = ["Cors"]

# The request headers the API reads (Last-Event-ID: fetch-based SSE clients resuming) and the
# response headers a page needs to act on an error.
ALLOW_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")
EXPOSE_HEADERS = ("Retry-After", "WWW-Authenticate")
ALLOW_METHODS = ("GET", "POST", "DELETE")
MAX_AGE_S = 600


class Cors(CORSMiddleware):
    """Starlette's CORS with the API's choices; a refused preflight is a problem document."""

    def __init__(self, app: ASGIApp, *, origins: Sequence[str]) -> None:
        super().__init__(app, allow_origins=list(origins), allow_methods=ALLOW_METHODS,
                         allow_headers=ALLOW_HEADERS, expose_headers=EXPOSE_HEADERS,
                         allow_credentials=False, max_age=MAX_AGE_S)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        detail = bytes(response.body).decode(errors="replace")  # "Disallowed CORS origin, ..."
        return problem_response(400, "cors-refused", detail)
