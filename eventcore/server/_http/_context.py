"""What every route needs, on ``app.state.eventcore``, and the FastAPI dependencies to get it.

Extension routers (WebRTC, ``/ui``, your own) use exactly these::

    from eventcore.server._http import ServiceContext, SessionAccess, get_context, session_reader

    router = APIRouter()

    @router.post("/v1/sessions/{session_id}/webrtc")
    async def offer(access: Annotated[SessionAccess, Depends(session_writer)]) -> ...:
        ctx = access.ctx            # log, hub, auth, settings, metrics, shutdown
        ...
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, Path, Request

from eventcore._keys import _SESSION_ID
from eventcore._settings import Settings

from ._auth import Auth, Principal, check_incarnation
from ._metrics import Metrics
from ._problems import Problem

if TYPE_CHECKING:
    from eventcore._log import EventLog
    from eventcore.server._hub import Hub

__all__ = [
    "ReadyCheck",
    "ServiceContext",
    "SessionAccess",
    "SessionIdPath",
    "get_context",
    "get_principal",
    "require_admin",
    "session_reader",
    "session_writer",
]

ReadyCheck = Callable[["ServiceContext"], Awaitable[tuple[bool, str]]]
"""``async (ctx) -> (ok, detail)``: one line of ``/readyz``."""

SESSION_ID_PATTERN = _SESSION_ID.pattern
SessionIdPath = Annotated[
    str, Path(pattern=f"^{SESSION_ID_PATTERN}$", min_length=1, max_length=128,
              description="1-128 of A-Z a-z 0-9 . _ : - starting with a letter or digit")
]


@dataclass(frozen=True, slots=True, eq=False)
class ServiceContext:
    """The running service: shared by every request of one app."""

    settings: Settings
    log: EventLog
    hub: Hub
    auth: Auth
    metrics: Metrics
    shutdown: anyio.Event = field(default_factory=anyio.Event)
    agents: Collection[str] | None = None
    ready_checks: dict[str, ReadyCheck] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    """Room for extensions' own objects (e.g. ``extras["webrtc"]``)."""


async def get_context(request: Request) -> ServiceContext:
    ctx: ServiceContext | None = getattr(request.app.state, "eventcore", None)
    if ctx is None:
        raise Problem(503, "unavailable", "the service is starting",
                      headers={"Retry-After": "1"})
    return ctx


async def get_principal(
    request: Request, ctx: Annotated[ServiceContext, Depends(get_context)]
) -> Principal:
    """The caller, from ``Authorization: Bearer`` or (GET only) ``?access_token=``."""
    principal = ctx.auth.from_header(request.headers.get("authorization"))
    if principal is None and request.method in ("GET", "HEAD"):
        query = request.query_params.getlist("access_token")
        if query:
            principal = ctx.auth.verify(query[0], from_query=True)
    if principal is None:
        raise Problem(401, "unauthorized", "credentials required: `Authorization: Bearer "
                      "<api key | session token>`", headers={"WWW-Authenticate": "Bearer"})
    return principal


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.admin:
        raise Problem(403, "forbidden", "this needs the API key")
    return principal


@dataclass(frozen=True, slots=True)
class SessionAccess:
    """An authorized caller of one session's endpoints. A session token has been checked
    against the session's current incarnation (so the session existed then); for the API key
    existence is not checked here."""

    session_id: str
    principal: Principal
    ctx: ServiceContext


def _access(write: bool) -> Callable[..., Awaitable[SessionAccess]]:
    # async: FastAPI runs plain functions in a worker thread, which costs more than they do
    async def dependency(
        session_id: SessionIdPath,
        principal: Annotated[Principal, Depends(get_principal)],
        ctx: Annotated[ServiceContext, Depends(get_context)],
    ) -> SessionAccess:
        if not principal.may(session_id, write=write):
            what = "write to" if write and principal.session_id == session_id else "access"
            raise Problem(403, "forbidden", f"this token may not {what} this session")
        await check_incarnation(principal, ctx.log, session_id)
        return SessionAccess(session_id, principal, ctx)

    return dependency


session_reader = _access(write=False)
"""Dependency: the caller may read ``{session_id}`` (API key, or that session's token)."""
session_writer = _access(write=True)
"""Dependency: the caller may write to ``{session_id}`` (API key, or its read-write token)."""
