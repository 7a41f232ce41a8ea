"""The projector: each session's read model, kept in Redis next to the session."""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import msgspec

from eventcore import CorruptEntry, EventLog, validate_session_id
from eventcore._layout import VIEW_INCARNATION, VIEW_SEQ, VIEW_VALUE
from eventcore._redis import redis_errors, run_scripts
from eventcore._scripts import lua

from ._ordered import OrderedSubscriber, Position, Run
from ._view import SessionView, fold

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["Projector", "read_view"]

_CAS = lua("eventcore.subscribers", "view_cas", with_layout=True)
_decode_view = msgspec.json.Decoder(SessionView).decode
_encode = msgspec.json.Encoder().encode


def _decode(session_id: str, raw: bytes) -> SessionView:
    try:
        return _decode_view(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise CorruptEntry(f"view of session {session_id!r} is malformed: {exc}") from exc


async def read_view(
    log: EventLog, session_id: str, *, incarnation: str | None = None
) -> SessionView | None:
    """The projected state of a session in one round trip, or None if there is none (never
    created, not projected yet, deleted, or expired after the session ended). With
    ``incarnation`` (``SessionInfo.incarnation``), only that incarnation's view: the id created
    again after an expiry shows nothing of its predecessor's, whose view may outlive it a bit."""
    key = log.keys.view(validate_session_id(session_id))
    with redis_errors("read view"):
        raw, inc = await cast("Awaitable[list[bytes | None]]",
                              log.redis.hmget(key, [VIEW_VALUE, VIEW_INCARNATION]))
    if raw is None or (incarnation is not None and (inc or b"").decode() != incarnation):
        return None
    return _decode(session_id, raw)


class Projector(OrderedSubscriber):
    """Folds every session's envelopes into a :class:`SessionView` stored at
    ``Keys.view(session_id)`` (a hash: ``seq`` and ``v``, the view JSON), so any API process
    serves ``GET /v1/sessions/{id}`` with :func:`read_view` in one call.

    The view, its seq and its incarnation are written together by one compare-and-set script,
    which is what makes application exactly once across consumers; the script also checks the
    incarnation against the session's metadata, so a deleted session is never projected again
    (``EventLog.delete_session`` removes its view with its keys) and the id created again starts
    from an empty view. After ``session.ended`` the view expires with the session
    (``view_ttl_s``, default the log's ``session_ttl_s``). One projector instance serves one
    runner at a time.
    """

    name = "projector"

    def __init__(self, log: EventLog, *, view_ttl_s: int | None = None) -> None:
        super().__init__(log)
        self.view_ttl_s = log.settings.session_ttl_s if view_ttl_s is None else view_ttl_s
        self._script: AsyncScript | None = None
        self._loaded: dict[str, tuple[Position, bytes | None]] = {}

    async def _read(self, session_ids: Collection[str]
                    ) -> dict[str, tuple[Position, bytes | None]]:
        keys = self.log.keys
        with redis_errors("read views"):
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hmget(keys.view(sid), [VIEW_SEQ, VIEW_VALUE, VIEW_INCARNATION])
                raw = await pipe.execute()
        return {sid: (Position(int(seq or 0), (inc or b"").decode()), v)
                for sid, (seq, v, inc) in zip(session_ids, raw, strict=True)}

    async def positions(self, session_ids: Collection[str]) -> Mapping[str, Position]:
        self._loaded = await self._read(session_ids)
        return {sid: pos for sid, (pos, _) in self._loaded.items()}

    def _ttl(self, view: SessionView) -> str:
        if view.status != "ended":
            return ""
        return str(self.view_ttl_s) if self.view_ttl_s > 0 else ""

    async def apply(self, runs: Sequence[Run]) -> Collection[str]:
        loaded, self._loaded = self._loaded, {}
        stale = [r.session_id for r in runs if r.session_id not in loaded]
        if stale:
            loaded.update(await self._read(stale))
        if self._script is None:
            self._script = self.log.redis.register_script(_CAS)
        keys = self.log.keys
        calls = []
        for run in runs:
            sid = run.session_id
            pos, raw = loaded[sid]
            base = None
            if (not run.reset and raw is not None and pos.seq == run.after
                    and pos.incarnation == run.incarnation):
                base = _decode(sid, raw)
            view = fold(run.envelopes, base)
            assert view is not None
            calls.append(([keys.view(sid), keys.session(sid).meta],
                          [run.incarnation, run.after, run.last, _encode(view),
                           self._ttl(view)]))
        with redis_errors("write views"):
            # a compare-and-set: sent again (NOSCRIPT on a new master), an applied item
            # answers its new position, which the caller re-reads
            results = await run_scripts(self.log.redis, self._script, calls)
        # -2: the incarnation was deleted or replaced meanwhile; nothing to retry
        return [r.session_id for r, res in zip(runs, results, strict=True)
                if int(res) not in (-1, -2)]
