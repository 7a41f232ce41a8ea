"""Listing sessions: newest first, filtered, in pages with an opaque cursor.

Every shard keeps a listing index, the zset ``ns:{N}:sessions`` (session id -> its incarnation,
microseconds of the Redis clock, strictly increasing within a shard), written by the very script
that creates the session and cleared by the one that deletes it. A page is a k-way merge of the
shards' indexes in Python (each read is one shard's slot, so it works on a cluster), in the order
``(incarnation, session id)`` descending; the metadata of each candidate is then read and the
filters applied. The cursor is the position of the last candidate examined, so:

- pages never repeat or skip a session that existed when the listing started (new sessions have
  larger incarnations: they land before the cursor, not inside the pages still to come);
- a deleted session disappears at once; one whose keys expired after its TTL is skipped and
  dropped from the index (by an atomic check-and-remove) the first time a listing meets it;
- filtered pages look at a bounded number of candidates (``budget``): a page may hold fewer
  sessions than ``limit`` and still have a ``next_cursor``; keep going until it is ``None``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from . import _layout as L
from ._codec import session_info
from ._keys import validate_session_id
from ._redis import redis_errors, run_script
from ._scripts import lua
from ._sessions import LISTING_FIELDS, SessionInfo, listing_fields
from .errors import CorruptEntry, ValidationError

if TYPE_CHECKING:
    from ._log import EventLog

__all__ = ["SessionFilter", "SessionPage", "list_sessions"]

PRUNE_LUA = lua("eventcore", "sessions_prune")
MAX_LIMIT = 1000
DEFAULT_BUDGET = 2000
# the index orders by the Redis clock, created_at is the creating process's: a created range is
# looked up in the index this much wider, then applied exactly to created_at
_CLOCK_MARGIN_US = 60 * 1_000_000
_MAX_CURSOR = 512


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """What a listing keeps: every given condition must hold. ``labels``: each key must be
    present with that value (a value of ``None``: present, any value). ``created_after`` is
    inclusive, ``created_before`` exclusive (naive datetimes are UTC)."""

    agent: str | None = None
    states: frozenset[str] | None = None
    labels: Mapping[str, str | None] = field(default_factory=dict)
    created_after: _dt.datetime | None = None
    created_before: _dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.states is not None:
            bad = sorted(set(self.states) - set(L.STATES))
            if bad:
                raise ValidationError(f"unknown state {bad[0]!r:.40}: use one of "
                                      f"{', '.join(L.STATES)}")
        after, before = _utc(self.created_after), _utc(self.created_before)
        object.__setattr__(self, "created_after", after)
        object.__setattr__(self, "created_before", before)
        if after is not None and before is not None and after >= before:
            raise ValidationError("created_after must be earlier than created_before")

    @property
    def active(self) -> bool:
        return bool(self.agent is not None or self.states is not None or self.labels
                    or self.created_after is not None or self.created_before is not None)

    def matches(self, info: SessionInfo) -> bool:
        if self.agent is not None and info.agent != self.agent:
            return False
        if self.states is not None and info.state not in self.states:
            return False
        for k, v in self.labels.items():
            if k not in info.labels or (v is not None and info.labels[k] != v):
                return False
        created = info.created_at
        if self.created_after is not None and (created is None or created < self.created_after):
            return False
        return not (self.created_before is not None
                    and (created is None or created >= self.created_before))

    def digest(self) -> str:
        """Binds a cursor to the filters it was issued for."""
        parts = [self.agent or "", ",".join(sorted(self.states or ())),
                 msgspec.json.encode(sorted(self.labels.items())).decode(),
                 self.created_after.isoformat() if self.created_after else "",
                 self.created_before.isoformat() if self.created_before else ""]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]

    def score_range(self) -> tuple[int | None, int | None]:
        """Bounds on the index score (incarnation, microseconds): (lowest, highest)."""
        lo = hi = None
        if self.created_after is not None:
            lo = _us(self.created_after) - _CLOCK_MARGIN_US
        if self.created_before is not None:
            hi = _us(self.created_before) + _CLOCK_MARGIN_US
        return lo, hi


class SessionPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of :func:`list_sessions`: newest first. ``next_cursor`` is ``None`` once the
    listing has been through every session."""

    sessions: list[SessionInfo]
    next_cursor: str | None
    examined: int = 0
    """How many index entries this page looked at (the filters' cost)."""


def _utc(when: _dt.datetime | None) -> _dt.datetime | None:
    if when is None:
        return None
    if not isinstance(when, _dt.datetime):
        raise ValidationError("created_after/created_before must be datetimes")
    return when.replace(tzinfo=_dt.UTC) if when.tzinfo is None else when.astimezone(_dt.UTC)


def _us(when: _dt.datetime) -> int:
    return int(when.timestamp() * 1_000_000)


# -- the cursor --------------------------------------------------------------------------------
def encode_cursor(score: int, session_id: str, digest: str) -> str:
    raw = msgspec.json.encode([1, score, session_id, digest])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str, digest: str) -> tuple[int, str]:
    """The position a cursor names; :class:`ValidationError` for anything else."""
    bad = ValidationError("invalid cursor: pass back a next_cursor of the same listing")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= _MAX_CURSOR or not cursor.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = msgspec.json.decode(raw, type=tuple[int, int, str, str])
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise bad from None
    version, score, sid, their_digest = value
    if version != 1 or not 0 <= score < 2**62:
        raise bad
    try:
        validate_session_id(sid)
    except ValidationError:
        raise bad from None
    if their_digest != digest:
        raise ValidationError("this cursor belongs to a listing with other filters")
    return score, sid


# -- the merge ---------------------------------------------------------------------------------
@dataclass(slots=True)
class _Shard:
    shard: int
    key: str
    buf: deque[tuple[int, str]] = field(default_factory=deque)
    after: tuple[int, str] | None = None  # the last position fetched (or the cursor)
    done: bool = False


async def _refill(log: EventLog, shards: Sequence[_Shard], chunk: int, lo: int | None,
                  hi: int | None) -> None:
    with redis_errors("list_sessions"):
        async with log.redis.pipeline(transaction=False) as pipe:
            for sh in shards:
                top: str = "+inf" if hi is None else str(hi)
                if sh.after is not None and (hi is None or sh.after[0] <= hi):
                    # inclusive: entries tied with it are filtered below; "" = past the score
                    top = f"({sh.after[0]}" if sh.after[1] == "" else str(sh.after[0])
                pipe.zrevrangebyscore(sh.key, top, "-inf" if lo is None else str(lo),
                                      start=0, num=chunk + 1, withscores=True)
            replies = await pipe.execute()
    for sh, reply in zip(shards, replies, strict=True):
        got = 0
        for member, score in reply:
            got += 1
            item = (int(score), member.decode() if isinstance(member, bytes) else str(member))
            if sh.after is not None and item >= sh.after:
                continue  # at or before the position already handed out
            sh.buf.append(item)
        if got < chunk + 1:
            sh.done = True
        elif not sh.buf:  # a whole chunk tied at the position's score: step past the score
            assert sh.after is not None
            sh.after = (sh.after[0], "")
        if sh.buf:
            sh.after = sh.buf[-1]


async def list_sessions(
    log: EventLog,
    *,
    filters: SessionFilter | None = None,
    limit: int = 50,
    cursor: str | None = None,
    budget: int = DEFAULT_BUDGET,
) -> SessionPage:
    """A page of the log's sessions, newest first (see the module's docstring)."""
    flt = filters or SessionFilter()
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"limit must be between 1 and {MAX_LIMIT}")
    digest = flt.digest()
    start = decode_cursor(cursor, digest) if cursor is not None else None
    keys = log.keys
    shards = [_Shard(n, keys.sessions(n), after=start) for n in keys.all_shards()]
    lo, hi = flt.score_range()
    chunk = min(MAX_LIMIT, max(limit, 100) if flt.active else limit)
    out: list[SessionInfo] = []
    stale: list[tuple[str, str, int, str]] = []
    examined = 0
    last = start
    leftover = False
    while len(out) < limit and examined < budget:
        empty = [sh for sh in shards if not sh.buf and not sh.done]
        if empty:
            await _refill(log, empty, chunk, lo, hi)
            continue
        live = [sh for sh in shards if sh.buf]
        if not live:
            break
        want = min(budget - examined, chunk if flt.active else limit - len(out))
        batch: list[tuple[int, str]] = []
        while len(batch) < want:
            live = [sh for sh in shards if sh.buf]
            if not live or any(not sh.buf and not sh.done for sh in shards):
                break  # a shard's next entry is unknown: it may come before the others' heads
            best = max(live, key=lambda sh: sh.buf[0])
            batch.append(best.buf.popleft())
        if flt.active:  # the filters' fields first; only the matches are read whole
            pre = await _prefilter(log, flt, batch, stale)
            examined += len(batch) - len(pre)
            if pre:
                last_dropped = batch[-1]
                batch = pre
            else:
                last = batch[-1]
                continue
        else:
            last_dropped = None
        metas = await _metas(log, [sid for _, sid in batch])
        leftover = False
        for i, ((score, sid), raw) in enumerate(zip(batch, metas, strict=True)):
            examined += 1
            last = (score, sid)
            info = _decode(sid, raw)
            if info is None:
                if not raw:
                    stale.append((keys.sessions(keys.shard_of(sid)),
                                  keys.session(sid).meta, score, sid))
                continue
            if info.incarnation and info.incarnation.isdigit() \
                    and int(info.incarnation) != score:
                continue  # re-created since the index was read: a newer session, not listed
            if flt.matches(info):
                out.append(info)
                if len(out) == limit:
                    leftover = i + 1 < len(batch) or (last_dropped is not None
                                                     and last_dropped != last)
                    break
        else:
            if last_dropped is not None:
                last = last_dropped
    if stale:
        await _prune(log, stale)
    remaining = leftover or any(sh.buf or not sh.done for sh in shards)
    next_cursor = encode_cursor(last[0], last[1], digest) if remaining and last else None
    return SessionPage(sessions=out, next_cursor=next_cursor, examined=examined)


async def _prefilter(log: EventLog, flt: SessionFilter, batch: Sequence[tuple[int, str]],
                     stale: list[tuple[str, str, int, str]]) -> list[tuple[int, str]]:
    """The candidates whose filter fields match (and are of the indexed incarnation); those
    with no metadata are noted as stale."""
    if not batch:
        return []
    keys = log.keys
    with redis_errors("list_sessions"):
        async with log.redis.pipeline(transaction=False) as pipe:
            for _, sid in batch:
                pipe.hmget(keys.session(sid).meta, list(LISTING_FIELDS))
            replies = await pipe.execute()
    after_ms = int(flt.created_after.timestamp() * 1000) if flt.created_after else None
    before_ms = int(flt.created_before.timestamp() * 1000) if flt.created_before else None
    out = []
    for (score, sid), raw in zip(batch, replies, strict=True):
        f = listing_fields(raw, labels=bool(flt.labels))
        if f is None:
            if all(v is None for v in raw):
                stale.append((keys.sessions(keys.shard_of(sid)), keys.session(sid).meta,
                              score, sid))
            continue
        if f.incarnation.isdigit() and int(f.incarnation) != score:
            continue
        if flt.agent is not None and f.agent != flt.agent:
            continue
        if flt.states is not None and f.state not in flt.states:
            continue
        if f.labels is not None and any(
                k not in f.labels or (v is not None and f.labels[k] != v)
                for k, v in flt.labels.items()):
            continue
        if after_ms is not None and (f.created_ms is None or f.created_ms < after_ms):
            continue
        if before_ms is not None and (f.created_ms is None or f.created_ms >= before_ms):
            continue
        out.append((score, sid))
    return out


async def _metas(log: EventLog, sids: Sequence[str]) -> list[dict[bytes, bytes]]:
    if not sids:
        return []
    with redis_errors("list_sessions"):
        async with log.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(log.keys.session(sid).meta)
            replies: list[dict[bytes, bytes]] = await pipe.execute()
    return replies


def _decode(sid: str, raw: Mapping[bytes, bytes]) -> SessionInfo | None:
    if not raw:
        return None
    try:
        return session_info(sid, raw)
    except CorruptEntry:
        return None  # unreadable metadata: not listed (GET /v1/sessions/{id} reports it)


async def _prune(log: EventLog, stale: Collection[tuple[str, str, int, str]]) -> None:
    script = log.redis.register_script(PRUNE_LUA)
    with redis_errors("list_sessions (prune)"):
        for index, meta, score, sid in stale:
            await run_script(script, [index, meta], [sid, score])
