"""The projector: each session's read model, kept in Redis next to the session."""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, cast

import msgspec

from eventcore import CorruptEntry, EventLog, validate_session_id
from eventcore._redis import redis_errors

from ._ordered import OrderedSubscriber, Run
from ._view import SessionView, fold

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["Projector", "read_view"]

_CAS = resources.files("subscribers").joinpath("_lua/view_cas.lua").read_text()
_decode_view = msgspec.json.Decoder(SessionView).decode
_encode = msgspec.json.Encoder().encode


def _decode(session_id: str, raw: bytes) -> SessionView:
    try:
        return _decode_view(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise CorruptEntry(f"view of session {session_id!r} is malformed: {exc}") from exc


async def read_view(log: EventLog, session_id: str) -> SessionView | None:
    """The projected state of a session in one round trip, or None if there is none (never
    created, not projected yet, or expired after the session ended)."""
    key = log.keys.view(validate_session_id(session_id))
    with redis_errors("read view"):
        raw = await cast("Awaitable[bytes | None]", log.redis.hget(key, "v"))
    return None if raw is None else _decode(session_id, raw)


class Projector(OrderedSubscriber):
    """Folds every session's envelopes into a :class:`SessionView` stored at
    ``Keys.view(session_id)`` (a hash: ``seq`` and ``v``, the view JSON), so any API process
    serves ``GET /v1/sessions/{id}`` with :func:`read_view` in one call.

    The view and its seq are written together by one compare-and-set script, which is what
    makes application exactly once across consumers. After ``session.ended`` the view expires
    with the session (``view_ttl_s``, default the log's ``session_ttl_s``; ``deleted_ttl_s``
    when the session was deleted). One projector instance serves one runner at a time.
    """

    name = "projector"

    def __init__(
        self, log: EventLog, *, view_ttl_s: int | None = None, deleted_ttl_s: int = 300
    ) -> None:
        super().__init__(log)
        self.view_ttl_s = log.settings.session_ttl_s if view_ttl_s is None else view_ttl_s
        self.deleted_ttl_s = deleted_ttl_s
        self._script: AsyncScript | None = None
        self._loaded: dict[str, tuple[int, bytes | None]] = {}

    async def _read(self, session_ids: Collection[str]) -> dict[str, tuple[int, bytes | None]]:
        keys = self.log.keys
        with redis_errors("read views"):
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hmget(keys.view(sid), ["seq", "v"])
                raw = await pipe.execute()
        return {sid: (int(seq or 0), v) for sid, (seq, v) in zip(session_ids, raw, strict=True)}

    async def positions(self, session_ids: Collection[str]) -> Mapping[str, int]:
        self._loaded = await self._read(session_ids)
        return {sid: seq for sid, (seq, _) in self._loaded.items()}

    def _ttl(self, view: SessionView) -> str:
        if view.status != "ended":
            return ""
        ttl = self.deleted_ttl_s if view.end_reason == "deleted" else self.view_ttl_s
        return str(ttl) if ttl > 0 else ""

    async def apply(self, runs: Sequence[Run]) -> Collection[str]:
        loaded, self._loaded = self._loaded, {}
        stale = [r.session_id for r in runs if loaded.get(r.session_id, (None,))[0] != r.after]
        if stale:
            loaded.update(await self._read(stale))
        if self._script is None:
            self._script = self.log.redis.register_script(_CAS)
        keys = self.log.keys
        with redis_errors("write views"):
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for run in runs:
                    seq, raw = loaded[run.session_id]
                    base = _decode(run.session_id, raw) if raw is not None else None
                    view = fold(run.envelopes, base if seq == run.after else None)
                    assert view is not None
                    await self._script(
                        keys=[keys.view(run.session_id)],
                        args=[run.after, run.last, _encode(view), self._ttl(view)],
                        client=pipe,
                    )
                results = await pipe.execute()
        return [r.session_id for r, res in zip(runs, results, strict=True) if int(res) != -1]
