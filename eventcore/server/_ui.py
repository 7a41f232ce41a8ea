"""``GET /ui``: a live session viewer in one self-contained page (no build step).

The page (``_static/ui.html``) takes ``#session=<id>&token=<session token or API key>`` in the
URL fragment, which browsers never send to the server, so the credential stays out of access
logs. It mints a short-lived read-only token for its ``EventSource`` (the one thing a browser
cannot authenticate with a header), follows the stream, and resumes after the last seq it
shows. A strict Content-Security-Policy allows only the page's own inline script and style
(by hash) and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

__all__ = ["ui_html", "ui_router"]


@cache
def ui_html() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy."""
    text = resources.files("eventcore.server").joinpath("_static/ui.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in bodies
        )

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return text.encode("utf-8"), csp


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
