"""The HTTP service, public: build the app, extend it, run it.

Importing this module imports FastAPI, uvicorn and aiortc; ``import eventcore`` alone does not.

    from eventcore.http import service_app, serve
    from eventcore.demo import app as agents
    serve(service_app(agents), port=8000)

``service_app`` is the full service (API + SSE hub + projector + persistence + retention +
WebRTC + ``/ui``, as ``eventcore serve`` runs it); ``create_app`` is the bare API to compose
yourself (see its docstring for ``services=``/``routers=`` and the :class:`ServiceContext`).
"""

from ._http import (
    Auth,
    GroupSpec,
    Problem,
    ServiceContext,
    SessionAccess,
    create_app,
    get_context,
    require_admin,
    serve,
    serve_async,
    session_reader,
    session_writer,
)
from ._system import builtin_subscribers, service_app

__all__ = [
    "Auth",
    "GroupSpec",
    "Problem",
    "ServiceContext",
    "SessionAccess",
    "builtin_subscribers",
    "create_app",
    "get_context",
    "require_admin",
    "serve",
    "serve_async",
    "service_app",
    "session_reader",
    "session_writer",
]
