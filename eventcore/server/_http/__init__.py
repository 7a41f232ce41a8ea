"""The HTTP service: FastAPI app under ``/v1``, SSE through the process's hub, auth, metrics.

Building and running it::

    from eventcore.server._http import create_app, serve

    app = create_app()                       # settings from EVENTCORE_*; opens its own EventLog
    serve(app, host="127.0.0.1", port=8000)  # uvicorn, JSON logs, graceful SSE drain

    # or inside a running loop, next to other components (``eventcore demo``):
    await serve_async(app, host=..., port=...)

``create_app(settings=None, *, log=None, archive=None, services=(), routers=(), agents=None,
groups=(), ready_checks=None, hub_options=None)`` — see its docstring.

Extension point (WebRTC, ``/ui``, custom routes)
------------------------------------------------
At startup the app builds one :class:`ServiceContext` — ``settings``, ``log`` (EventLog),
``hub`` (the SSE hub, also an ``EnvelopeSource`` via ``hub.follow(session_id, after)``),
``auth`` (:class:`Auth`: ``mint(session_id, incarnation=, scope=, ttl_s=)``,
``verify(credential)``),
``metrics`` (prometheus), ``shutdown`` (an ``anyio.Event`` set when the server starts draining)
and ``extras`` (a dict for extensions' objects) — and stores it on ``app.state.eventcore``.

- ``services=[factory]``: ``factory(ctx)`` returns an async context manager entered after the
  log and hub exist and exited before them (run a WebRTC gateway, the built-in subscribers...).
- ``routers=[APIRouter]``: included after ``/v1``. Inside a route use the dependencies:
  ``Depends(get_context) -> ServiceContext``; ``Depends(session_reader)`` /
  ``Depends(session_writer) -> SessionAccess(session_id, principal, ctx)`` for a path with
  ``{session_id}`` (validates the id, authenticates, authorizes: API key or that session's
  token; 401/403/422 as problem+json); ``Depends(require_admin)`` for API-key-only routes.
- Raise :class:`Problem(status, slug, detail)` for an ``application/problem+json`` answer; any
  :class:`~eventcore.EventcoreError` is mapped too (SessionNotFound 404, SessionEnded 409, ...).
"""

from ._app import ServiceFactory, create_app
from ._auth import Auth, Principal, redact
from ._context import (
    ReadyCheck,
    ServiceContext,
    SessionAccess,
    SessionIdPath,
    get_context,
    get_principal,
    require_admin,
    session_reader,
    session_writer,
)
from ._health import GroupSpec
from ._problems import Problem, problem_response
from ._routes import input_event_key
from ._serve import configure_logging, serve, serve_async, uvicorn_config
from ._sse import sse_frame

__all__ = [
    "Auth",
    "GroupSpec",
    "Principal",
    "Problem",
    "ReadyCheck",
    "ServiceContext",
    "ServiceFactory",
    "SessionAccess",
    "SessionIdPath",
    "configure_logging",
    "create_app",
    "get_context",
    "get_principal",
    "input_event_key",
    "problem_response",
    "redact",
    "require_admin",
    "serve",
    "serve_async",
    "session_reader",
    "session_writer",
    "sse_frame",
    "uvicorn_config",
]
