"""``GET /ui``: a live session viewer in one page (no build step), and ``GET /ui/eventcore.js``,
the browser SDK it is built on (one dependency-free ES module, for any page to import).

The page (``_static/ui.html``) takes ``#token=<API key or session token>`` and optionally
``session=<id>`` in the URL fragment, which browsers never send to the server, so the
credential stays out of access logs. With the API key and no session it lists the sessions
(``GET /v1/sessions``, polled; a server without it says so); a session shows its events (filter
by type and text), its run tree (runs, tool calls, effects: status, duration, error), signals
and inputs, and a cancel button. The SDK reads the stream with ``fetch`` and the credential in
the ``Authorization`` header (never in a URL), every event type, resuming with
``Last-Event-ID``. A strict Content-Security-Policy allows only the page's own inline module
and style (by hash), scripts of this origin (the SDK) and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from ._http._context import SessionAccess, session_reader
from ._http._params import PageSize, SeqParam
from ._http._problems import Problem

__all__ = ["sdk_js", "ui_html", "ui_router"]


@cache
def ui_html() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy."""
    text = resources.files("eventcore.server").joinpath("_static/ui.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", text, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in bodies
        )

    csp = (
        f"default-src 'none'; script-src 'self' {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return text.encode("utf-8"), csp


@cache
def sdk_js() -> bytes:
    """The browser SDK (``_static/eventcore.js``)."""
    return resources.files("eventcore.server").joinpath("_static/eventcore.js").read_bytes()


ui_router = APIRouter(tags=["ui"])


@ui_router.get("/ui", response_class=Response, summary="A live session viewer (HTML)",
               responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}})
async def get_ui() -> Response:
    body, csp = ui_html()
    return Response(body, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": csp,
        "Cache-Control": "no-cache",
        "X-Frame-Options": "DENY",
    })


@ui_router.get("/ui/eventcore.js", response_class=Response,
               summary="The browser SDK: one dependency-free ES module",
               responses={200: {"content": {"text/javascript": {"schema": {"type": "string"}}}}})
async def get_sdk() -> Response:
    # Public, static and read without credentials: any origin may import it (a module script
    # is fetched in CORS mode), whatever EVENTCORE_CORS_ORIGINS allows for the API itself.
    return Response(sdk_js(), media_type="text/javascript; charset=utf-8", headers={
        "Cache-Control": "no-cache",
        "Access-Control-Allow-Origin": "*",
        "X-Content-Type-Options": "nosniff",
    })


# the kinds whose server_data may explain a failure (the worker keeps a failed run's traceback)
FAILURE_TYPES = frozenset({"run.failed", "run.timed_out", "session.ended"})


@ui_router.get("/ui/api/sessions/{session_id}/failures",
               summary="Failure details the viewer shows admins (server_data; API key only)")
async def get_failures(
    access: Annotated[SessionAccess, Depends(session_reader)],
    after: Annotated[SeqParam, Query(description="Failures with seq > after")] = 0,
    limit: Annotated[PageSize, Query(description="Most envelopes scanned")] = 100,
) -> Response:
    """``server_data`` of the session's failure envelopes (``run.failed``, ``run.timed_out``,
    ``session.ended``) after ``after``: what ``/ui`` shows an admin under a failed run (the
    traceback). ``server_data`` never goes to clients otherwise, so this needs the API key."""
    if not access.principal.admin:
        raise Problem(403, "forbidden", "failure details (server_data) need the API key")
    log = access.ctx.log
    await log.get_session(access.session_id)  # 404 for an unknown session
    envs = await log.read(access.session_id, after, limit, types=set(FAILURE_TYPES))
    out: list[dict[str, Any]] = [
        {"seq": e.seq, "type": e.type, "run_id": e.run_id, "server_data": e.server_data}
        for e in envs if e.server_data is not None
    ]
    return Response(msgspec.json.encode({"failures": out}), media_type="application/json",
                    headers={"Cache-Control": "no-store"})
