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

from fastapi import APIRouter
from starlette.responses import Response

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
