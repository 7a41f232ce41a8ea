"""``create_app()``: the FastAPI application of one API process."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi

from eventcore._log import EventLog, HistoryArchive
from eventcore._settings import Settings, load_settings

from ._auth import AccessLogRedactor, Auth
from ._context import ReadyCheck, ServiceContext
from ._cors import Cors
from ._docs import install_docs
from ._health import GroupSpec, builtin_checks
from ._health import router as health_router
from ._metrics import Metrics
from ._middleware import EdgeMiddleware
from ._models import EventsPage
from ._problems import PROBLEM_JSON, ProblemModel, install_problem_handlers
from ._routes import router as v1_router
from ._schedules import router as schedules_router
from ._transport import AbortableApp
from ._ws import router as ws_router

__all__ = ["ServiceFactory", "create_app"]

logger = logging.getLogger("eventcore.server")

ServiceFactory = Callable[[ServiceContext], AbstractAsyncContextManager[Any]]
"""Something with a lifetime started after the log and hub (and stopped before them): the
built-in subscribers, a WebRTC gateway, ... Receives the context; may put objects in
``ctx.extras``."""

_V1_ERRORS = ("400", "401", "403", "404", "409", "410", "413", "422", "431", "503")


def create_app(
    settings: Settings | None = None,
    *,
    log: EventLog | None = None,
    archive: HistoryArchive | None = None,
    services: Sequence[ServiceFactory] = (),
    routers: Sequence[APIRouter] = (),
    agents: Collection[str] | None = None,
    groups: Sequence[GroupSpec] = (),
    ready_checks: Mapping[str, ReadyCheck] | None = None,
    hub_options: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The HTTP API (DESIGN.md §10) with its SSE hub, ready for any ASGI server.

    - ``settings``: defaults to the environment (``EVENTCORE_*``); ignored when ``log`` is
      given (the log's settings are used).
    - ``log``: an already started :class:`EventLog` to share (not closed by the app);
      otherwise the app opens its own at startup (with ``archive`` for tiered replay).
    - ``services``: factories entered in order at startup, after the log and hub exist.
    - ``routers``: extra routers, included after /v1 (they use the dependencies of
      :mod:`eventcore.server._http`).
    - ``agents``: if given, ``POST /v1/sessions`` refuses other agent names (422).
    - ``groups``: consumer groups ``/readyz`` requires on every shard, e.g.
      ``[("feed", "projector"), ("dispatch", "workers")]``.
    - ``ready_checks``: more ``/readyz`` lines.
    - ``hub_options``: keyword arguments for :class:`eventcore.server._hub.Hub`.
    """
    if log is not None:
        settings = log.settings
    elif settings is None:
        settings = load_settings()
    cfg = settings
    auth = Auth(
        cfg.api_key.get_secret_value() if cfg.api_key is not None else None,
        secret=cfg.token_secret.get_secret_value() if cfg.token_secret is not None else None,
        token_ttl_s=cfg.token_ttl_s,
    )
    if auth.generated_key:
        logger.warning("EVENTCORE_API_KEY is not set: this process made up an API key "
                       "(app.state.auth.api_key); session tokens die with the process")
    metrics = Metrics()
    checks = {**builtin_checks(groups), **(ready_checks or {})}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from eventcore.server._hub import Hub

        _install_redaction()
        async with contextlib.AsyncExitStack() as stack:
            the_log = log
            if the_log is None:
                the_log = await stack.enter_async_context(EventLog(cfg, archive=archive))
            options: dict[str, Any] = {"live": cfg.sse_live, "buffer": cfg.sse_buffer,
                                       "buffer_bytes": cfg.sse_buffer_bytes,
                                       "on_lag": metrics.hub_lag.observe,
                                       **(hub_options or {})}
            hub = await stack.enter_async_context(Hub(the_log, **options))
            metrics.bind_hub(hub)
            ctx = ServiceContext(settings=cfg, log=the_log, hub=hub, auth=auth,
                                 metrics=metrics, agents=agents, ready_checks=checks)
            tg = await stack.enter_async_context(anyio.create_task_group())
            await tg.start(_drain_on_shutdown, ctx)
            for factory in services:
                await stack.enter_async_context(factory(ctx))
            await tg.start(metrics.poll_subscriber_lag, the_log)  # after the groups exist
            app.state.eventcore = ctx
            try:
                yield
            finally:
                app.state.eventcore = None
                ctx.shutdown.set()
                hub.drain()
                tg.cancel_scope.cancel()

    app = AbortableApp(
        title="eventcore", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Event-sourced streaming sessions: create sessions, stream their events "
        "over SSE (resumable with Last-Event-ID), send inputs and signals, replay signals.",
    )
    app.state.eventcore = None
    app.state.auth = auth
    app.state.metrics = metrics
    install_problem_handlers(app)
    app.include_router(v1_router)
    app.include_router(ws_router)
    app.include_router(_telephony_router())
    app.include_router(schedules_router)
    app.include_router(health_router)
    for router in routers:
        app.include_router(router)
    install_docs(app)  # /docs and /redoc from local assets: they work offline
    app.add_middleware(EdgeMiddleware, max_body=lambda: cfg.http_max_body,
                       observe=metrics.observe_request)
    if cfg.cors_origins:  # outermost, so the edge's own 413/431 answers are readable too
        app.add_middleware(Cors, origins=cfg.cors_origins)
    _document(app)
    return app


async def _drain_on_shutdown(ctx: ServiceContext, *, task_status: anyio.abc.TaskStatus[None]
                             ) -> None:
    """When the server starts draining, end every SSE stream with a retry hint at once instead
    of holding the shutdown until the graceful timeout."""
    task_status.started()
    await ctx.shutdown.wait()
    logger.info("draining: closing %d event stream(s) with a retry hint", ctx.hub.clients)
    ctx.hub.drain()


def _telephony_router() -> APIRouter:
    # at call time: the telephony package uses this one's dependencies
    from eventcore.server._telephony import router

    return router


def _install_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "eventcore.server"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, AccessLogRedactor) for f in lg.filters):
            lg.addFilter(AccessLogRedactor())


def _version() -> str:
    from eventcore import __version__

    return __version__


def _document(app: FastAPI) -> None:
    """Errors are documented as problem+json (FastAPI's default 422 shape is replaced), the
    bearer scheme is declared, and the JSON events page is added to the components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {})
        models = comps.setdefault("schemas", {})
        ref = "#/components/schemas/{model}"
        for model in (ProblemModel, EventsPage):
            js = model.model_json_schema(ref_template=ref)
            models.update(js.pop("$defs", {}))
            models[model.__name__] = js
        problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemModel"}}}
        comps["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "The API key, or a session token"},
            "accessToken": {"type": "apiKey", "in": "query", "name": "access_token",
                            "description": "GET only: a read-scoped session token"},
        }
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                responses = op.setdefault("responses", {})
                if path.startswith("/v1/"):
                    for code in _V1_ERRORS:
                        responses.setdefault(code, {"description": "Error"})
                    op["security"] = [{"bearer": []}] + (
                        [{"accessToken": []}] if method == "get" else [])
                for code, resp in responses.items():
                    if code[0] in "45":
                        resp["content"] = problem
                        resp.setdefault("description", "Error")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
