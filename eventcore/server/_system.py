"""Composing processes from the parts: the API with its built-in subscribers (``serve``)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from eventcore._extras import has_extra, require_extra
from eventcore._log import EventLog
from eventcore._settings import Settings

from ._http import GroupSpec, ServiceContext, create_app

if TYPE_CHECKING:
    from fastapi import FastAPI

    from eventcore.workers import App

__all__ = ["builtin_subscribers", "service_app"]


@contextlib.asynccontextmanager
async def builtin_subscribers(
    ctx: ServiceContext, *, hot_window_s: float | None = None
) -> AsyncIterator[None]:
    """The projector, persistence (also the log's archive for tiered replay) and retention,
    running for as long as the API process does. Retention's hot window and interval come from
    the settings (``EVENTCORE_HOT_WINDOW_S``, ``EVENTCORE_RETENTION_INTERVAL_S``) unless
    ``hot_window_s`` is given."""
    from eventcore.subscribers import Persistence, Projector, Retention, SubscriberRunner

    log = ctx.log
    settings = log.settings
    async with Persistence(log) as store:
        previous, log.archive = log.archive, store
        try:
            async with (
                SubscriberRunner(log, Projector(log)),
                SubscriberRunner(log, store, checkpoints=store),
                Retention(log, store,
                          hot_window_s=settings.hot_window_s if hot_window_s is None
                          else hot_window_s,
                          interval_s=settings.retention_interval_s,
                          dead_letter_max_age_s=settings.dead_letter_ttl_s or None,
                          dead_letter_maxlen=settings.dead_letter_maxlen or None),
            ):
                yield
        finally:
            log.archive = previous


def service_app(
    agents: App | None = None,
    settings: Settings | None = None,
    *,
    log: EventLog | None = None,
    subscribers: bool = True,
    webrtc: bool | None = None,
    hot_window_s: float | None = None,
    **options: Any,
) -> FastAPI:
    """The full HTTP service: /v1 API + SSE hub, the built-in subscribers, WebRTC and /ui.

    ``agents`` (a :class:`eventcore.workers.App`) restricts ``POST /v1/sessions`` to its agent
    names. ``webrtc=None`` serves WebRTC when the ``webrtc`` extra is installed; ``True``
    requires it (:class:`eventcore.MissingExtra` if it is not)."""
    from ._http._schedules import scheduler_service
    from ._ui import ui_router
    from ._webrtc_http import webrtc_router, webrtc_service

    services: list[Any] = [scheduler_service]  # cron schedules (EVENTCORE_SCHEDULES)
    routers: list[Any] = [ui_router]
    groups: list[GroupSpec] = []
    if subscribers:
        services.append(functools.partial(builtin_subscribers, hot_window_s=hot_window_s))
        groups += [("feed", "projector"), ("feed", "persistence")]
    if webrtc is None:
        webrtc = has_extra("webrtc")
    if webrtc:
        require_extra("webrtc", "WebRTC (service_app(webrtc=True))")
        services.append(webrtc_service)
        routers.append(webrtc_router)
    return create_app(
        settings, log=log, services=services, routers=routers,
        agents=None if agents is None else list(agents.agents), groups=groups, **options,
    )
