"""The HTTP service, public: build the app, extend it, run it.

The service layer: it depends on the log, the workers and the subscribers, never the reverse.
It needs the ``server`` extra (``pip install 'eventcore[server]'``; WebRTC also ``[webrtc]``);
without it, using any name here raises :class:`eventcore.MissingExtra` naming the extra.
``import eventcore.server`` itself imports nothing heavy: the names load on first use.

    from eventcore.server import service_app, serve
    from eventcore.server.demo import app as agents
    serve(service_app(agents), port=8000)

``service_app`` is the full service (API + SSE hub + projector + persistence + retention +
WebRTC + ``/ui``, as ``eventcore serve`` runs it); ``create_app`` is the bare API to compose
yourself (see its docstring for ``services=``/``routers=`` and the :class:`ServiceContext`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from eventcore._extras import require_extra

if TYPE_CHECKING:
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

_HOME = {name: "._system" if name in {"builtin_subscribers", "service_app"} else "._http"
         for name in __all__}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_extra("server", "eventcore.server")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
