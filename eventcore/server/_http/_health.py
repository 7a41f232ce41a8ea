"""``/healthz`` (the process answers), ``/readyz`` (it can serve: Redis reachable, scripts
loaded, consumer groups present, live path connected) and ``/metrics``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from ._context import ReadyCheck, ServiceContext, get_context
from ._metrics import CONTENT_TYPE_LATEST
from ._problems import Problem

__all__ = ["GroupSpec", "builtin_checks", "router"]

router = APIRouter(tags=["operations"])
Ctx = Annotated[ServiceContext, Depends(get_context)]

GroupSpec = tuple[Literal["feed", "dispatch"], str]
"""A consumer group that must exist on every shard's feed (or dispatch) stream."""


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis, scripts, consumer groups, live path",
            responses={503: {"description": "Not ready; the body says which check failed"}})
async def readyz(ctx: Ctx) -> Response:
    import msgspec

    results: dict[str, dict[str, Any]] = {}
    ok_all = True
    for name, check in ctx.ready_checks.items():
        try:
            with anyio.fail_after(2.0):
                ok, detail = await check(ctx)
        except Exception as exc:  # a failing check is a "no", never a 500
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
        results[name] = {"ok": ok, "detail": detail}
        ok_all = ok_all and ok
    body = msgspec.json.encode({"status": "ready" if ok_all else "not ready", "checks": results})
    return Response(body, status_code=200 if ok_all else 503, media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(ctx: Ctx, request: Request) -> Response:
    if ctx.settings.metrics_auth:  # (the query-string token is never accepted here)
        principal = ctx.auth.from_header(request.headers.get("authorization"))
        if principal is None:
            raise Problem(401, "unauthorized", "/metrics needs `Authorization: Bearer <api "
                          "key>` (EVENTCORE_METRICS_AUTH)", headers={"WWW-Authenticate": "Bearer"})
        if not principal.admin:
            raise Problem(403, "forbidden", "/metrics needs the API key")
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _redis_check(ctx: ServiceContext) -> tuple[bool, str]:
    await ctx.log.redis.ping()
    return True, "PING ok"


def _scripts() -> dict[str, str]:
    from eventcore._append import APPEND_LUA
    from eventcore._effects import CLAIM_LUA
    from eventcore._log import DELETE_LUA

    return {"append": APPEND_LUA, "effect_claim": CLAIM_LUA, "delete": DELETE_LUA}


async def _scripts_check(ctx: ServiceContext) -> tuple[bool, str]:
    """The Lua scripts are in Redis' script cache; missing ones (a restarted Redis) are loaded
    now, so the first append after a restart does not pay for it."""
    scripts = _scripts()
    shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in scripts.items()}
    exists = await ctx.log.redis.script_exists(*shas.values())
    reloaded = []
    for (name, text), present in zip(scripts.items(), exists, strict=True):
        if not present:
            await ctx.log.redis.script_load(text)
            reloaded.append(name)
    return True, f"reloaded {', '.join(reloaded)}" if reloaded else "loaded"


def _groups_check(groups: Sequence[GroupSpec]) -> ReadyCheck:
    async def check(ctx: ServiceContext) -> tuple[bool, str]:
        keys = ctx.log.keys
        missing: list[str] = []
        async with ctx.log.redis.pipeline(transaction=False) as pipe:
            for shard in keys.all_shards():
                pipe.xinfo_groups(keys.feed(shard))
                pipe.xinfo_groups(keys.dispatch(shard))
            results = await pipe.execute(raise_on_error=False)
        for shard in keys.all_shards():
            present = {
                "feed": _names(results[2 * shard]), "dispatch": _names(results[2 * shard + 1]),
            }
            missing += [f"{kind}/{shard}:{g}" for kind, g in groups if g not in present[kind]]
        if missing:
            return False, "missing " + ", ".join(missing[:10])
        return True, f"{len(groups)} group(s) on {keys.shards} shard(s)"

    return check


def _names(groups: Any) -> set[str]:
    if isinstance(groups, BaseException):
        return set()
    return {g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
            for g in groups}


async def _hub_check(ctx: ServiceContext) -> tuple[bool, str]:
    ok = ctx.hub.live_connected and not ctx.hub.closed
    return ok, f"live path {ctx.hub.live} {'connected' if ok else 'not connected'}"


def builtin_checks(groups: Sequence[GroupSpec]) -> dict[str, ReadyCheck]:
    checks: dict[str, ReadyCheck] = {
        "redis": _redis_check, "scripts": _scripts_check, "hub": _hub_check,
    }
    if groups:
        checks["groups"] = _groups_check(groups)
    return checks
