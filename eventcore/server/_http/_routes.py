"""The /v1 session endpoints (DESIGN.md §10), except the SSE stream (``_sse.py``)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Body, Depends, Query
from starlette.responses import Response

from eventcore._codec import client_json
from eventcore._envelope import Envelope
from eventcore._keys import validate_key
from eventcore._listing import SessionFilter, list_sessions
from eventcore._sessions import SessionInfo, ms_datetime
from eventcore.errors import CorruptEntry

from ._auth import Principal
from ._context import (
    SESSION_ID_PATTERN,
    ServiceContext,
    SessionAccess,
    get_context,
    require_admin,
    session_reader,
    session_writer,
)
from ._models import (
    CancelIn,
    CreateSessionIn,
    CreateSessionOut,
    DeadLetterOut,
    DeadLettersOut,
    InputIn,
    SeqOut,
    SessionListOut,
    SessionOut,
    SessionSummary,
    SignalIn,
    SignalsOut,
    TokenIn,
    TokenOut,
)
from ._params import PageSize, SeqParam
from ._problems import Problem
from ._sse import event_stream

__all__ = ["input_event_key", "router"]

logger = logging.getLogger("eventcore.server")

router = APIRouter(prefix="/v1", tags=["sessions"])

Reader = Annotated[SessionAccess, Depends(session_reader)]
Writer = Annotated[SessionAccess, Depends(session_writer)]
Ctx = Annotated[ServiceContext, Depends(get_context)]


def input_event_key(idempotency_key: str) -> str:
    """The event key of an input with this idempotency key. Prefixed so a client key can never
    collide with the log's own keys (``session.created``, ``effect:...``); the WebRTC inputs
    channel uses the same form, so a retry over either transport dedupes against the other."""
    return f"input:{validate_key(idempotency_key, 'idempotency_key')}"


@contextlib.contextmanager
def _timed(ctx: ServiceContext, kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        ctx.metrics.append_seconds.labels(kind).observe(time.perf_counter() - started)


def _json(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


@router.post("/sessions", status_code=201, response_model=CreateSessionOut,
             summary="Create a session and dispatch it to its agent")
async def create_session(
    body: CreateSessionIn, _: Annotated[Principal, Depends(require_admin)], ctx: Ctx
) -> CreateSessionOut:
    if ctx.agents is not None and body.agent not in ctx.agents:
        raise Problem(422, "unknown-agent", f"no agent named {body.agent!r} is registered")
    info = await _with_timing(ctx, "session.created", ctx.log.create_session(
        body.agent, labels=body.metadata, input=body.input, ttl_s=body.ttl_s,
        idempotency_key=body.idempotency_key,
    ))
    return CreateSessionOut(session_id=info.session_id, stream=info.stream,
                            incarnation=info.incarnation,
                            token=ctx.auth.mint(info.session_id, incarnation=info.incarnation))


async def _with_timing(ctx: ServiceContext, kind: str, aw: Any) -> Any:
    with _timed(ctx, kind):
        return await aw


_MAX_LABEL_FILTERS = 16


def _label_filters(labels: list[str] | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in labels or ():
        key, eq, value = item.partition("=")
        if not key or len(key) > 128 or len(value) > 1024:
            raise Problem(422, "validation-error", "label filters are `key=value` or `key` "
                          "(key 1-128 characters, value at most 1024)")
        out[key] = value if eq else None
    if len(out) > _MAX_LABEL_FILTERS:
        raise Problem(422, "validation-error",
                      f"at most {_MAX_LABEL_FILTERS} label filters")
    return out


def _states(states: list[str] | None) -> frozenset[str] | None:
    if not states:
        return None
    wanted = frozenset(p.strip() for s in states for p in s.split(",") if p.strip())
    return wanted or None


def _summary(info: SessionInfo) -> SessionSummary:
    return SessionSummary(
        session_id=info.session_id, stream=info.stream, incarnation=info.incarnation,
        state=info.state, agent=info.agent, labels=info.labels, last_seq=info.last_seq,
        host=info.host, created_at=info.created_at, updated_at=info.updated_at,
        ended_at=info.ended_at, ttl_s=info.ttl_s,
    )


@router.get("/sessions", response_model=SessionListOut,
            summary="List sessions, newest first, filtered, in pages (API key only)")
async def get_sessions(
    _: Annotated[Principal, Depends(require_admin)],
    ctx: Ctx,
    agent: Annotated[str | None, Query(min_length=1, max_length=500,
                                       description="Only sessions of this agent")] = None,
    state: Annotated[list[str] | None, Query(
        max_length=8, description="Only these states (repeat, or comma-separate): created, "
        "active, idle, ended")] = None,
    label: Annotated[list[str] | None, Query(
        max_length=_MAX_LABEL_FILTERS, description="`key=value` (that value) or `key` (any "
        "value); repeat for more, all must hold")] = None,
    created_after: Annotated[_dt.datetime | None, Query(
        description="Created at or after (ISO 8601; no offset: UTC)")] = None,
    created_before: Annotated[_dt.datetime | None, Query(
        description="Created before (ISO 8601; no offset: UTC)")] = None,
    limit: Annotated[PageSize, Query(description="Most sessions on the page")] = 50,
    cursor: Annotated[str | None, Query(min_length=1, max_length=512,
                                        description="next_cursor of the previous page")] = None,
) -> SessionListOut:
    filters = SessionFilter(agent=agent, states=_states(state), labels=_label_filters(label),
                            created_after=created_after, created_before=created_before)
    page = await list_sessions(ctx.log, filters=filters, limit=limit, cursor=cursor)
    return SessionListOut(sessions=[_summary(i) for i in page.sessions],
                          next_cursor=page.next_cursor)


@router.get("/sessions/{session_id}", response_model=SessionOut,
            summary="The session's state (projected, plus its metadata)")
async def get_session(access: Reader) -> SessionOut:
    log = access.ctx.log
    info = await log.get_session(access.session_id)
    return SessionOut(
        session_id=info.session_id, stream=info.stream, incarnation=info.incarnation,
        state=info.state, agent=info.agent, labels=info.labels, last_seq=info.last_seq,
        created_at=info.created_at, updated_at=info.updated_at, ended_at=info.ended_at,
        projection=await _projection(access.ctx, access.session_id, info.incarnation),
        host=info.host if access.principal.admin else None,
        ttl_s=info.ttl_s if access.principal.admin else None,
    )


async def _projection(ctx: ServiceContext, session_id: str, incarnation: str
                      ) -> dict[str, Any] | None:
    from eventcore.subscribers import read_view

    try:  # only this incarnation's view: the one of a predecessor may still be expiring
        view = await read_view(ctx.log, session_id, incarnation=incarnation)
    except CorruptEntry as exc:  # the metadata is still worth answering with
        logger.error("session %r: unreadable projection: %s", session_id, exc)
        return None
    if view is None:
        return None
    out = msgspec.to_builtins(view)
    return out if isinstance(out, dict) else {"value": out}


router.add_api_route(
    "/sessions/{session_id}/events", event_stream, methods=["GET"],
    summary="The session's envelopes: SSE (default) or JSON pages (format=json)",
    responses={200: {"content": {
        "text/event-stream": {"schema": {
            "type": "object", "description": "One SSE event: id = seq, event = envelope type, "
            "data = the envelope JSON (EnvelopeModel)",
            "properties": {"id": {"type": "string"}, "event": {"type": "string"},
                           "data": {"type": "string", "contentMediaType": "application/json"},
                           "retry": {"type": "integer"}},
        }},
        "application/json": {"schema": {"$ref": "#/components/schemas/EventsPage"}},
    }}, 204: {"description": "The session has ended and the client has seen all of it."}},
    response_model=None,
)


@router.post("/sessions/{session_id}/inputs", response_model=SeqOut,
             summary="Append an input (idempotent with idempotency_key)")
async def post_input(body: InputIn, access: Writer) -> SeqOut:
    ctx = access.ctx
    env = Envelope(type="input", session_id=access.session_id, payload=body.payload,
                   event_key=input_event_key(body.idempotency_key)
                   if body.idempotency_key is not None else "")
    with _timed(ctx, "input"):
        res = await ctx.log.append(env)
    return SeqOut(seq=res.seq, duplicate=res.duplicate)


@router.post("/sessions/{session_id}/signals", response_model=SeqOut,
             summary="Emit a signal")
async def post_signal(body: SignalIn, access: Writer) -> SeqOut:
    ctx = access.ctx
    with _timed(ctx, "signal"):
        res = await ctx.log.signal(access.session_id, body.key, body.value)
    return SeqOut(seq=res.seq, duplicate=res.duplicate)


@router.get("/sessions/{session_id}/signals", response_model=SignalsOut,
            summary="Every signal after since_seq, in seq order (optionally only some keys)")
async def get_signals(
    access: Reader,
    since_seq: Annotated[SeqParam, Query()] = 0,
    keys: Annotated[str | None, Query(max_length=8192,
                                      description="Comma-separated signal keys")] = None,
) -> Response:
    wanted = None
    if keys is not None and keys.strip():
        wanted = [k.strip() for k in keys.split(",") if k.strip()]
        for k in wanted:
            try:
                validate_key(k, "signal key")
            except ValueError as exc:
                raise Problem(422, "validation-error", str(exc)[:300]) from None
    log = access.ctx.log
    await log.get_session(access.session_id)  # 404 for an unknown session
    signals = await log.replay_signals(access.session_id, since_seq, wanted)
    return _json(b'{"signals":[' + b",".join(client_json(e) for e in signals) + b"]}")


@router.post("/sessions/{session_id}/cancel", status_code=202, response_model=SeqOut,
             summary="Request cancellation (of one run, or of the session's current work)")
async def post_cancel(
    access: Writer, body: Annotated[CancelIn | None, Body()] = None
) -> SeqOut:
    from eventcore.workers import cancel

    ctx = access.ctx
    req = body or CancelIn()
    with _timed(ctx, "control.cancel"):
        res = await cancel(ctx.log, access.session_id, run_id=req.run_id,
                           reason=req.reason or "cancelled")
    return SeqOut(seq=res.seq, duplicate=res.duplicate)


@router.delete("/sessions/{session_id}", status_code=204, response_class=Response,
               summary="End the session and delete it (its keys, view and persisted history)")
async def delete_session(access: Writer) -> Response:
    if not await access.ctx.log.delete_session(access.session_id):
        raise Problem(404, "session-not-found",
                      f"session {access.session_id!r} does not exist")
    return Response(status_code=204)


@router.post("/sessions/{session_id}/tokens", response_model=TokenOut,
             summary="Mint a session token (read-scoped ones may go in an EventSource URL)")
async def post_token(access: Reader, body: Annotated[TokenIn | None, Body()] = None
                     ) -> TokenOut:
    req = body or TokenIn()
    if req.scope == "rw" and not access.principal.may(access.session_id, write=True):
        raise Problem(403, "forbidden", "a read-only token cannot mint a read-write one")
    info = await access.ctx.log.get_session(access.session_id)
    principal = access.principal
    # a token holder's incarnation was checked; the session may have been re-created since
    incarnation = info.incarnation if principal.admin else principal.incarnation
    ttl = req.ttl_s
    exp = principal.expires_at
    if exp is not None:  # never outlive the credential that minted it
        ttl = max(1, min(ttl, exp - int(time.time())))
    token = access.ctx.auth.mint(access.session_id, incarnation=incarnation, scope=req.scope,
                                 ttl_s=ttl)
    return TokenOut(token=token, scope=req.scope, expires_in=ttl)



@router.get("/dead-letters", response_model=DeadLettersOut, tags=["operations"],
            summary="Sessions the workers gave up on, oldest first (API key only)")
async def get_dead_letters(
    _: Annotated[Principal, Depends(require_admin)],
    ctx: Ctx,
    session: Annotated[str | None, Query(min_length=1, max_length=128,
                                         pattern=f"^{SESSION_ID_PATTERN}$",
                                         description="Only this session's")] = None,
    limit: Annotated[PageSize, Query(description="Most records per shard")] = 100,
) -> DeadLettersOut:
    from eventcore.workers import dead_letters

    records = await dead_letters(ctx.log, count=limit)
    return DeadLettersOut(dead_letters=[
        DeadLetterOut(entry_id=d.entry_id, session_id=d.session_id, agent=d.agent,
                      attempts=d.attempts, error=msgspec.to_builtins(d.error), worker=d.worker,
                      at=ms_datetime(d.at_ms) if d.at_ms else None)
        for d in records if session is None or d.session_id == session
    ])
