"""Append: turning envelopes into script arguments, and the group-commit batcher.

Concurrent appends in one process are queued per shard; a flush task started for the shard
runs on the next event-loop tick and sends everything queued so far in one EVALSHA. While that
round trip is in flight, new appends queue up for the next one. One flush in flight per shard
keeps each shard's submissions in order. The appender sends on connections of its own (at most
one per shard, 16 at most), so appends neither wait for nor starve the shared pool.

Every batch carries a token; the script stores its results under it for a few minutes, so when
redis-py resends a batch whose reply was lost (dropped connection, restart) the resend gets the
first answer instead of appending twice. That is what makes generated event keys safe without
writing them to the dedupe map.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self

import msgspec

from ._coalesce import ShardCoalescer
from ._codec import encode
from ._envelope import Envelope
from ._keys import Keys, SessionKeys, validate_key, validate_session_id
from ._layout import ENTRY_BLOB
from ._redis import Redis, is_cluster, redis_errors
from ._replicated import Replicated
from ._scripts import lua
from .errors import (
    CorruptEntry,
    EventcoreError,
    PayloadTooLarge,
    SessionEnded,
    SessionNotFound,
    StaleHost,
    ValidationError,
)

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection as Connection
    from redis.commands.core import AsyncScript

__all__ = ["AppendResult", "Appender", "PreparedAppend"]

APPEND_LUA = lua("eventcore", "append", with_prelude=True)

_STALE, _MISSING, _ENDED = "2", "3", "4"
_BLOB_PREFIX = "sha256:"
# the flag that makes the append script mark the entry blob-backed (its ENTRY_BLOB field)
_BLOB_FLAG = ENTRY_BLOB.encode()
_KEY_CACHE = 65536
_KEYED = frozenset({"signal", "effect"})
_KNOWN_TYPES = frozenset({
    "session.created", "session.started", "session.ended", "run.started", "run.completed",
    "run.failed", "run.cancelled", "run.timed_out", "tool.started", "tool.ended", "input",
    "signal", "effect", "message", "log", "session.checkpoint",
})
# the records argument of the append script (``_lua/append.lua``): a plain event's record is
# a newline, its session index and type index as two bytes, then its body; a full event's
_NL = 10  # a newline (an int: "in" then searches with memchr, 6x faster)
_FULL = b"\n\0\0"
_HEADS = [[b"\n" + bytes((i, t)) for t in range(256)] for i in range(256)]


# known types that need no aux: prepare()'s fast path takes them
_PLAIN_TYPES = _KNOWN_TYPES - _KEYED - {"session.created"}


class _Ids:
    """Generated event keys and batch tokens: a random per-process prefix and a counter, unique
    across processes and ~20x cheaper than uuid4 per event. A forked child gets a new prefix (a
    token shared with its parent would answer the child's batch with the parent's results)."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.reseed()

    def reseed(self) -> None:
        self.prefix = "g" + os.urandom(9).hex() + "-"


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reseed)


class AppendResult(msgspec.Struct, frozen=True, gc=False):
    """Where an append landed. ``duplicate`` means the event key was already in the log and
    ``seq`` is the first envelope's. ``incarnation`` is set for an appended
    ``session.created``: the new session's incarnation."""

    session_id: str
    seq: int
    event_key: str
    duplicate: bool = False
    incarnation: str = ""


class HostingAck(NamedTuple):
    """Releases a worker's hosting of a session together with the append of its end: the
    dispatch entry ``entry_id`` is acknowledged in consumer group ``group`` and the lease of
    ``host`` dropped, atomically with ``session.ended``."""

    group: str
    entry_id: str
    host: str

    def aux(self) -> str:
        return "\0".join(self)


class PreparedAppend(msgspec.Struct, frozen=True, gc=False):
    """An envelope encoded for the append script (``_lua/append.lua`` describes the fields)."""

    keys: SessionKeys
    type: str
    wire_key: str  # '' when generated (the script then skips the dedupe map)
    event_key: str
    body: bytes  # the envelope JSON without seq and without its opening brace
    extra: bytes  # b'' or flags NUL server_data NUL aux
    blob: tuple[str, bytes] | None
    epoch: int | None


class Appender:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        inline_limit: int,
        max_payload: int,
        max_batch: int,
        token_ttl_s: int = 60,
        max_connections: int = 16,
        replicas: int = 0,
        replicas_timeout_ms: int = 1000,
        retry_budget_s: float = 15.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        # the append script rings the dispatch doorbell channel only for a cluster client (the
        # only kind whose group reads listen to it)
        self._ring = "1" if is_cluster(redis) else ""
        self._inline_limit = inline_limit
        self._max_payload = max_payload
        self._max_batch = max_batch
        self._token_ttl_s = token_ttl_s
        self._script: AsyncScript = redis.register_script(APPEND_LUA)
        self._commit: ShardCoalescer[PreparedAppend, AppendResult] = ShardCoalescer(
            lambda _shard, items: self._send(items), max_batch=max_batch)
        #: ``enqueue(item.keys.shard, item)`` is :meth:`append` (bound once, for the hot path)
        self.enqueue = self._commit.enqueue
        self._session_keys: dict[str, SessionKeys] = {}
        self._idle: list[Connection] = []
        self._conn_slots = asyncio.Semaphore(max(1, min(keys.shards, max_connections)))
        self.round_trips = 0
        #: replicated acknowledgement: WAIT <replicas> <timeout> after each batch, on its
        #: connection (WAIT waits for that connection's writes); the other scripts held to the
        #: same rule (claims, schedule fires, deletes, effect claims) run through it too
        self.replicated = Replicated(redis, replicas=replicas, timeout_ms=replicas_timeout_ms,
                                     retry_budget_s=retry_budget_s)
        # per shard: the highest write counter the append script answered this writer (the
        # script compares it with the shard's to detect lost acknowledged writes)
        self.writes: dict[int, int] = {}

    def session_keys(self, session_id: str) -> SessionKeys:
        """Validated, cached key names of a session (the hot path builds them once)."""
        keys = self._session_keys.get(session_id) if type(session_id) is str else None
        if keys is None:
            validate_session_id(session_id)
            if len(self._session_keys) >= _KEY_CACHE:
                self._session_keys.clear()
            keys = self._session_keys[session_id] = self._keys.session(session_id)
        return keys

    # -- preparing -----------------------------------------------------------------------------
    def prepare(self, env: Envelope, epoch: int | None = None, aux: str = "") -> PreparedAppend:
        # the common event first: a known plain type, generated key, nothing server-side, no
        # epoch or aux, small enough to go inline (the checks below all pass for it)
        typ = env.type
        if (
            epoch is None and not aux and env.event_key == "" and env.seq == 0
            and env.server_data is None and env.payload_ref is None and type(typ) is str
            and typ in _PLAIN_TYPES
        ):
            sid = env.session_id
            keys = self._session_keys.get(sid) if type(sid) is str else None
            if keys is not None:
                event_key = f"{_ids.prefix}{next(_ids.counter)}"
                try:
                    encoded = encode(env)
                except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:
                    raise ValidationError(f"envelope is not JSON-encodable: {exc}") from exc
                # omit_defaults left event_key out: splice it in (the key is plain ASCII)
                body = b'"event_key":"' + event_key.encode() + b'",' + encoded[1:]
                if len(body) < self._inline_limit:
                    return PreparedAppend(keys, typ, "", event_key, body, b"", None, None)
        return self._prepare(env, epoch, aux)

    def _prepare(self, env: Envelope, epoch: int | None, aux: str) -> PreparedAppend:
        keys = self.session_keys(env.session_id)
        typ = env.type
        if type(typ) is not str or (
            typ not in _KNOWN_TYPES and (not typ or len(typ) > 128 or not typ.isprintable())
        ):
            raise ValidationError(f"invalid envelope type {typ!r:.80}")
        if epoch is not None and (not isinstance(epoch, int) or epoch < 0):
            raise ValidationError(f"epoch must be a non-negative int, got {epoch!r:.40}")
        if typ in _KEYED:
            aux = validate_key(aux, f"{typ} key") if aux else _payload_key(env)
        elif typ == "session.created":
            if not aux:
                raise ValidationError("create sessions with EventLog.create_session()")
        elif typ != "session.ended" or epoch is None:
            aux = ""  # only signal, effect, session.created and a host's end use it
        generated = env.event_key == ""
        event_key = (
            f"{_ids.prefix}{next(_ids.counter)}"
            if generated
            else validate_key(env.event_key, "event_key")
        )
        try:
            if env.seq == 0 and env.server_data is None and env.payload_ref is None:
                body = encode(env)
                if generated:
                    # omit_defaults left event_key out: splice it in (the key is plain ASCII)
                    body = b'"event_key":"' + event_key.encode() + b'",' + body[1:]
                else:
                    body = body[1:]
            else:
                body = encode(msgspec.structs.replace(
                    env, seq=0, server_data=None, event_key=event_key, payload_ref=None
                ))[1:]
            server_data = b"" if env.server_data is None else encode(env.server_data)
        except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:
            raise ValidationError(f"envelope is not JSON-encodable: {exc}") from exc
        blob = None
        if len(body) >= self._inline_limit:
            payload = encode(env.payload)
            if len(payload) > self._max_payload:
                raise PayloadTooLarge(
                    f"payload is {len(payload)} bytes; the limit is {self._max_payload}"
                )
            digest = hashlib.sha256(payload).hexdigest()
            blob = (self._keys.blob(keys.shard, digest), payload)
            body = encode(
                msgspec.structs.replace(
                    env, seq=0, server_data=None, event_key=event_key,
                    payload=None, payload_ref=_BLOB_PREFIX + digest,
                )
            )[1:]
            if len(body) >= self._inline_limit:
                raise PayloadTooLarge(
                    f"envelope is {len(body) + 1} bytes without its payload; "
                    f"the inline limit is {self._inline_limit}"
                )
        if len(server_data) > self._max_payload:
            raise PayloadTooLarge(f"server_data is {len(server_data)} bytes")
        if server_data or blob or aux:
            extra = (_BLOB_FLAG if blob else b"") + b"\0" + server_data + b"\0" + aux.encode()
        else:
            extra = b""
        return PreparedAppend(
            keys, typ, "" if generated else event_key, event_key, body, extra, blob, epoch
        )

    # -- submitting ----------------------------------------------------------------------------
    def append(self, item: PreparedAppend) -> asyncio.Future[AppendResult]:
        """Queue ``item`` for the shard's next group commit; await the answer (a future, not a
        coroutine: one frame less per event on the hot path)."""
        return self._commit.enqueue(item.keys.shard, item)

    async def append_many(self, items: Sequence[PreparedAppend]) -> list[AppendResult]:
        """Direct batch: one script call per shard and chunk, bypassing the tick batcher."""
        by_shard: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_shard.setdefault(item.keys.shard, []).append(i)
        results: list[AppendResult | EventcoreError | None] = [None] * len(items)
        for group in by_shard.values():
            for start in range(0, len(group), self._max_batch):
                chunk = group[start : start + self._max_batch]
                sent = await self._send([items[i] for i in chunk])
                for i, res in zip(chunk, sent, strict=True):
                    results[i] = res
        out: list[AppendResult] = []
        for got in results:
            if isinstance(got, EventcoreError):
                raise got
            assert got is not None
            out.append(got)
        return out

    async def __aenter__(self) -> Self:
        await self._commit.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Send the batches already queued (their callers are waiting), then let go of the
        connections."""
        try:
            await self._commit.__aexit__(et, e, tb)
        finally:
            idle, self._idle = self._idle, []
            for conn in idle:
                await conn.disconnect()

    async def _acquire(self) -> Connection:
        """A connection of the appender's own (a pool checkout costs more than the Python side
        of a whole batch, and appends should neither starve nor be starved by readers)."""
        await self._conn_slots.acquire()
        try:
            if self._idle:
                return self._idle.pop()
            conn: Connection = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            return conn
        except BaseException:
            self._conn_slots.release()
            raise

    def _release(self, conn: Connection) -> None:
        self._idle.append(conn)
        self._conn_slots.release()

    def script_call(self, batch: Sequence[PreparedAppend], token: str
                    ) -> tuple[list[str], list[Any], dict[str, bytes]]:
        """The append script's keys and arguments for one shard's batch (``_lua/append.lua``
        documents them), and the blobs to store first: the one place that lays them out, for
        callers that run the script inside their own (the scheduler). Its reply is one value
        per event then the shard's write counter: give it to :meth:`observe_writes`."""
        first = batch[0].keys
        keys: list[str] = [first.feed, first.dispatch, self._keys.batch(first.shard, token),
                           first.incarnation, self._keys.epoch(first.shard)]
        sids: list[str] = []
        records: list[bytes] = []
        events: list[Any] = []
        slot: dict[str, int] = {}
        types: dict[str, int] = {}
        blobs: dict[str, bytes] = {}
        heads = _HEADS
        for item in batch:
            k = item.keys
            idx = slot.get(k.session_id)
            if idx is None:
                idx = slot[k.session_id] = len(slot) + 1
                keys += (k.stream, k.meta, k.dedupe, k.signals, k.effects, k.lease)
                sids.append(k.session_id)
            if item.blob is not None:
                blobs[item.blob[0]] = item.blob[1]
            body = item.body
            if item.epoch is None and not item.wire_key and not item.extra and idx < 256:
                tidx = types.get(item.type)
                if tidx is None:
                    tidx = types[item.type] = len(types) + 1
                if tidx < 256 and _NL not in body:
                    # a plain event: a record (JSON holds no raw newline: the guard is for
                    # the impossible)
                    records.append(heads[idx][tidx])  # (no pair to allocate per event)
                    records.append(body)
                    continue
            records.append(_FULL)
            events += (
                idx, item.type, item.wire_key, body,
                "" if item.epoch is None else item.epoch, item.extra,
            )
        keys.append(first.sessions)  # the shard's listing index, after the sessions' keys
        args = [len(batch), int(time.time() * 1000), first.notify, first.wake,
                self._token_ttl_s, self.writes.get(first.shard, 0), len(sids),
                self._ring, *sids, len(types), *types, b"".join(records), *events]
        return keys, args, blobs

    def observe_writes(self, shard: int, counter: Any) -> None:
        """Remember the shard's write counter an append script answered (how a later append
        detects that the shard lost acknowledged writes)."""
        if type(counter) is int and counter > self.writes.get(shard, 0):
            self.writes[shard] = counter

    async def _send(
        self, batch: Sequence[PreparedAppend], token: str | None = None
    ) -> list[AppendResult | EventcoreError]:
        first = batch[0].keys
        token = token or f"{_ids.prefix}b{next(_ids.counter)}"
        keys, args, blobs = self.script_call(batch, token)
        with redis_errors("append"):
            if blobs:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, data in blobs.items():
                        pipe.set(key, data, nx=True)
                    await pipe.execute()
            if is_cluster(self._redis):
                # no pool of its own to draw from: routed by the first key (the shard's feed)
                raw, replicated = await self.replicated.run(self._script, keys, args)
            else:
                conn = await self._acquire()
                try:
                    raw, replicated = await self.replicated.run(self._script, keys, args,
                                                                conn=conn)
                finally:
                    self._release(conn)
        self.round_trips += 1
        if not isinstance(raw, list) or len(raw) != len(batch) + 1:
            raise CorruptEntry(f"append script answered {raw!r:.80} for {len(batch)} events")
        self.observe_writes(first.shard, raw.pop())
        results = [
            AppendResult(item.keys.session_id, value, item.event_key)
            if type(value) is int and value > 0
            else _result(item, value)
            for item, value in zip(batch, raw, strict=True)
        ]
        if any(isinstance(r, AppendResult) for r in results):
            # not acknowledged when too few replicas confirmed them in time
            self.replicated.check(replicated, results)
        return results


def _result(item: PreparedAppend, value: Any) -> AppendResult | EventcoreError:
    sid = item.keys.session_id
    if isinstance(value, list) and len(value) == 2:  # a session.created: {seq, incarnation}
        seq, inc = value
        return AppendResult(sid, int(seq), item.event_key,
                            incarnation=inc.decode() if isinstance(inc, bytes) else str(inc))
    if isinstance(value, int):
        if value > 0:
            return AppendResult(sid, value, item.event_key)
        return AppendResult(sid, -value, item.event_key, duplicate=True)
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    code, _, detail = text.partition(":")
    if code == _STALE:
        return StaleHost(sid, item.epoch or 0, int(detail))
    if code == _MISSING:
        return SessionNotFound(sid)
    if code == _ENDED:
        return SessionEnded(sid, f"session {sid!r} has ended; it accepts no more events")
    return CorruptEntry(f"session {sid!r}: {detail or text}")


def _payload_key(env: Envelope) -> str:
    """The signal/effect key of a ``signal``/``effect`` envelope's payload."""
    payload = env.payload
    key = payload.get("key") if isinstance(payload, dict) else getattr(payload, "key", None)
    if not isinstance(key, str):
        raise ValidationError(f"a {env.type!r} envelope needs a payload with a string 'key'")
    return validate_key(key, f"{env.type} key")
