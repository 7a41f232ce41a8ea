"""``POST /v1/sessions/{id}/webrtc`` and the gateway's place in the service's lifetime.

Plugged into the app through its extension points::

    create_app(services=[webrtc_service], routers=[webrtc_router])
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, Field

from eventcore.errors import ValidationError

from ._http._context import ServiceContext, SessionAccess, get_context, session_reader
from ._http._problems import Problem
from ._webrtc import WebRTCGateway, WebRTCLimits

__all__ = ["OfferIn", "webrtc_router", "webrtc_service"]

EXTRA_KEY = "webrtc"
_MAX_SDP = WebRTCLimits().max_offer_bytes


class OfferIn(BaseModel):
    """An SDP offer, as a browser's ``pc.localDescription`` serializes it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["offer"]
    sdp: str = Field(min_length=1, max_length=_MAX_SDP)


class AnswerOut(BaseModel):
    type: Literal["answer"]
    sdp: str
    peer_id: str = Field(description="Names this peer connection in the server's logs.")


@contextlib.asynccontextmanager
async def webrtc_service(
    ctx: ServiceContext, *, limits: WebRTCLimits | None = None
) -> AsyncIterator[WebRTCGateway]:
    """The gateway for one API process (a ``create_app(services=...)`` factory): followers
    share the SSE hub; peers close on exit. ``functools.partial`` sets other ``limits``; by
    default a peer that stops reading is closed after the SSE send timeout."""
    if limits is None:
        limits = WebRTCLimits(send_timeout_s=ctx.settings.sse_send_timeout_s)
    async with WebRTCGateway(ctx.log, followers=ctx.hub, limits=limits) as gateway:
        gauges = _bind_metrics(ctx, gateway)
        ctx.extras[EXTRA_KEY] = gateway
        try:
            yield gateway
        finally:
            ctx.extras.pop(EXTRA_KEY, None)
            for gauge in gauges:
                ctx.metrics.registry.unregister(gauge)


def _bind_metrics(ctx: ServiceContext, gateway: WebRTCGateway) -> list[Gauge]:
    """Gauges read from the gateway's counters at scrape time, in the app's registry."""
    stats, r = gateway.stats, ctx.metrics.registry
    specs: list[tuple[str, str, Callable[[], float]]] = [
        ("eventcore_webrtc_peers", "Open WebRTC peer connections",
         lambda: float(len(gateway.peers))),
        ("eventcore_webrtc_peers_opened", "WebRTC peers opened, in total",
         lambda: float(stats.peers_opened)),
        ("eventcore_webrtc_events_sent", "Envelopes sent on events channels, in total",
         lambda: float(stats.events_sent)),
        ("eventcore_webrtc_inputs_accepted", "Inputs and signals appended from WebRTC, in total",
         lambda: float(stats.inputs_accepted)),
        ("eventcore_webrtc_inputs_rejected", "WebRTC input messages refused, in total",
         lambda: float(stats.inputs_rejected)),
        ("eventcore_webrtc_slow_closed", "WebRTC peers closed because they stopped reading, "
         "in total", lambda: float(stats.slow_closed)),
    ]
    gauges = []
    for name, doc, read in specs:
        gauge = Gauge(name, doc, registry=r)
        gauge.set_function(read)
        gauges.append(gauge)
    return gauges


webrtc_router = APIRouter(prefix="/v1", tags=["webrtc"])


@webrtc_router.post(
    "/sessions/{session_id}/webrtc", response_model=AnswerOut,
    summary="WebRTC: SDP offer in, answer out (data channels `events` and `inputs`)",
    description=(
        "Offer a peer connection with data channels only (one m=application section). "
        "Channel `events`: send `{\"after\": N}` first, then receive the session's envelopes "
        "(seq > N) as SSE would send them. Channel `inputs`: send `{\"type\": \"input\", "
        "\"payload\": ..., \"idempotency_key\": ...}` or `{\"type\": \"signal\", \"key\": ..., "
        "\"value\": ...}`; each gets an `ack` with its seq or an `error`. Host candidates only "
        "(no trickle): the answer is complete. A read-only token may stream events but not "
        "send inputs; the connection closes when the credential expires."
    ),
)
async def post_offer(
    body: OfferIn,
    access: Annotated[SessionAccess, Depends(session_reader)],
    ctx: Annotated[ServiceContext, Depends(get_context)],
) -> AnswerOut:
    gateway = ctx.extras.get(EXTRA_KEY)
    if not isinstance(gateway, WebRTCGateway) or ctx.shutdown.is_set():
        raise Problem(503, "unavailable", "WebRTC is not running on this server",
                      headers={"Retry-After": "1"})
    try:
        answer = await gateway.answer(
            access.session_id, body.sdp,
            expires_at=access.principal.expires_at,
            writable=access.principal.may(access.session_id, write=True),
            # a token opens its own incarnation only; the API key the current one
            incarnation=None if access.principal.admin else access.principal.incarnation,
        )
    except ValidationError as exc:
        raise Problem(400, "invalid-offer", str(exc)[:500],
                      title="The SDP offer cannot be used") from None
    return AnswerOut(type="answer", sdp=answer.sdp, peer_id=answer.peer_id)
