"""EventLog: the public face of the core log (append, read, tail, sessions, signals, effects)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, cast

import anyio
import msgspec

from . import _effects
from ._append import Appender, AppendResult, HostingAck, PreparedAppend
from ._codec import (
    decode_body,
    decode_entry,
    decode_json,
    encode,
    entry_has_blob,
    entry_type,
    session_info,
)
from ._embedded import EmbeddedRedis
from ._envelope import (
    Envelope,
    ErrorInfo,
    SessionCreatedPayload,
    SessionEndedPayload,
    SignalPayload,
    SignalSummary,
)
from ._follow import LogFollowers, closing_iter
from ._keys import validate_key, validate_session_id
from ._layout import META_SEQ
from ._redis import Redis, open_redis, redis_errors
from ._scripts import lua
from ._sessions import (
    INCARNATION_FIELDS,
    SessionInfo,
    current_incarnation,
    ms_datetime,
)
from ._settings import Settings, load_settings
from ._values import validate_value
from .errors import (
    ConfigError,
    CorruptEntry,
    HistoryGone,
    SessionNotFound,
    UsageError,
    ValidationError,
)

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["DELETE_LUA", "EventLog", "HistoryArchive"]

DELETE_LUA = lua("eventcore", "delete", with_prelude=True)

T = TypeVar("T")

SIGNAL_INLINE_LIMIT = 4096
SUMMARY_SAMPLE_CHARS = 256


class HistoryArchive(Protocol):
    """Where trimmed history lives (persistence). Consulted when Redis no longer has a seq."""

    async def read(self, session_id: str, after: int, limit: int) -> Sequence[Envelope]: ...


class EventLog:
    """The session log on Redis. Use as ``async with EventLog() as log:`` or call :meth:`aclose`.

    With no ``redis_url`` (argument or ``EVENTCORE_REDIS_URL``) it starts the embedded Redis.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: Redis | None = None,
        archive: HistoryArchive | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = settings if settings is not None else load_settings(**overrides)
        self.keys = self.settings.keys()
        self.archive = archive
        self._embedded: EmbeddedRedis | None = None
        self._owns_redis = redis is None
        self._redis: Redis | None = redis
        self._appender: Appender | None = None
        self._lifetime: contextlib.AsyncExitStack | None = None
        self._delete_script: AsyncScript | None = None
        if redis is not None:
            self._bind(redis)

    def _bind(self, redis: Redis) -> None:
        self._redis = redis
        s = self.settings
        self._appender = Appender(
            redis, self.keys, inline_limit=s.inline_limit, max_payload=s.max_payload,
            max_batch=s.max_batch,
            # a batch is resent only within the retry budget: keep its answer a bit longer than
            # that, no more (at 100k appends/s every second of TTL holds ~2,000 answers)
            token_ttl_s=max(30, math.ceil(2 * s.retry_budget_s) + 5),
            replicas=s.append_replicas, replicas_timeout_ms=s.append_replicas_timeout_ms,
            retry_budget_s=s.retry_budget_s,
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect (starting the embedded Redis if no URL is set) and check the server.

        ``start()`` and :meth:`aclose` must run in the same task (what ``async with`` does):
        the appender's group commit runs in a task group of that task."""
        if self._lifetime is not None:
            raise UsageError("this EventLog is already started")
        self._lifetime = contextlib.AsyncExitStack()
        try:
            await self._connect()
            await self._lifetime.enter_async_context(self.appender)
        except BaseException:
            await self.aclose()
            raise

    async def _connect(self) -> None:
        if self._redis is None:
            url = self.settings.redis_url
            if url is None:
                self._embedded = EmbeddedRedis(self.settings.data_dir, self.settings.redis_server)
                url = await anyio.to_thread.run_sync(self._embedded.start)
            s = self.settings
            self._bind(await open_redis(
                url, mode=s.redis_mode if self._embedded is None else "single",
                cluster_nodes=s.redis_cluster_nodes, retry_budget_s=s.retry_budget_s,
                max_connections=s.pool_size,
            ))
        with redis_errors("connect"):
            await self.redis.ping()
        await self._check_shards()

    async def _check_shards(self) -> None:
        """The first process of a deployment records its shard count; every later one must
        have the same (with another count, sessions would be looked up in the wrong shard)."""
        key, shards = self.keys.shard_count(), self.keys.shards
        with redis_errors("connect"):
            if await self.redis.set(key, shards, nx=True):
                return
            stored = await self.redis.get(key)
        if stored is None:  # deleted in between: the next start records it again
            return
        if not stored.isdigit():
            raise CorruptEntry(f"{key} holds {stored[:40]!r}, not a shard count")
        if int(stored) != shards:
            raise ConfigError(
                f"EVENTCORE_SHARDS is {shards} but this deployment (namespace "
                f"{self.settings.namespace!r}) was created with {int(stored)} shards: the shard "
                f"count is fixed for the life of a deployment; set EVENTCORE_SHARDS="
                f"{int(stored)} (or use another namespace)")

    async def aclose(self) -> None:
        lifetime, self._lifetime = self._lifetime, None
        if lifetime is not None:
            await lifetime.aclose()  # the appender sends what is queued, then stops
        if self._redis is not None and self._owns_redis:
            await self._redis.aclose()
            self._redis = None
            self._appender = None
        if self._embedded is not None:
            await anyio.to_thread.run_sync(self._embedded.stop)
            self._embedded = None

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise UsageError("EventLog is not started: use `async with EventLog(...)`")
        return self._redis

    @property
    def appender(self) -> Appender:
        if self._appender is None:
            raise UsageError("EventLog is not started: use `async with EventLog(...)`")
        return self._appender

    # -- append ----------------------------------------------------------------------------------
    async def append(
        self, envelope: Envelope, *, epoch: int | None = None, aux: str = ""
    ) -> AppendResult:
        """Append one envelope (group-committed with concurrent appends). Safe to retry with the
        same ``event_key``: the log keeps the first."""
        appender = self._appender or self.appender  # (the property raises when not started)
        item = appender.prepare(envelope, epoch, aux)
        # Appender.append without its frame (the hot path: one call less per event)
        return await appender.enqueue(item.keys.shard, item)

    async def append_many(
        self, envelopes: Sequence[Envelope], *, epoch: int | None = None
    ) -> list[AppendResult]:
        """Append a batch in one script call per shard. Raises the first refusal after the whole
        batch was processed; events before and after it that were accepted stay committed, so
        retrying the same batch (same event keys) is the way to finish it."""
        prepare = self.appender.prepare
        return await self.appender.append_many([prepare(e, epoch) for e in envelopes])

    async def emit(
        self,
        session_id: str,
        type: str,
        payload: Any = None,
        *,
        event_key: str = "",
        run_id: str | None = None,
        server_data: Any = None,
        trace: str | None = None,
        epoch: int | None = None,
    ) -> AppendResult:
        env = Envelope(
            type=type, session_id=session_id, payload=payload, event_key=event_key,
            run_id=run_id, server_data=server_data, trace=trace,
        )
        return await self.append(env, epoch=epoch)

    # -- read ------------------------------------------------------------------------------------
    async def read(
        self, session_id: str, after: int = 0, limit: int = 1000, *, types: set[str] | None = None
    ) -> list[Envelope]:
        """Up to ``limit`` envelopes with seq > ``after``, in seq order (``types`` filters
        without decoding the others). Trimmed history comes from the archive; if it is gone
        everywhere, :class:`HistoryGone`."""
        return (await self._page(session_id, after, limit, types))[0]

    async def _page(
        self, session_id: str, after: int, limit: int, types: set[str] | None
    ) -> tuple[list[Envelope], int]:
        """One page after ``after`` and the last seq it covered (``after`` if none)."""
        validate_session_id(session_id)
        if type(after) is not int or type(limit) is not int or after < 0 or limit < 1:
            raise ValidationError(f"after must be an int >= 0 and limit >= 1, got {after!r:.20}, "
                                  f"{limit!r:.20}")
        keys = self.keys.session(session_id)
        with redis_errors("read"):
            entries = await self.redis.xrange(keys.stream, f"({_sid(after)}", "+", count=limit)
        out = await self._decode(entries, keys.stream, types)
        first = _seq_of(entries[0][0]) if entries else None
        covered = _seq_of(entries[-1][0]) if entries else after
        if first == after + 1:
            return out, covered
        if first is None:
            # Nothing after `after` in the stream: nothing newer, or trimmed? Ask the stream and
            # the last seq atomically: read apart, an append landing in between looks like a trim.
            with redis_errors("read"):
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.xrange(keys.stream, f"({_sid(after)}", "+", count=limit)
                    pipe.hget(keys.meta, META_SEQ)
                    entries, last = await pipe.execute()
            if entries:
                return await self._page(session_id, after, limit, types)  # appended meanwhile
            if last is None and self.archive is not None:
                # Gone from Redis (deleted, or expired after it ended): the archive has it.
                old = list(await self.archive.read(session_id, after, limit))
                covered = old[-1].seq if old else after
                return [e for e in old if types is None or e.type in types], covered
            if last is None or int(last) <= after:
                return out, covered  # nothing newer: not a gap
            first = int(last) + 1  # everything after `after` was trimmed
        # Redis starts above after+1: this page comes from the archive only; the next page
        # picks up in Redis.
        want = min(limit, first - after - 1)
        return await self._from_archive(session_id, after, want, first, types), after + want

    async def _from_archive(
        self, session_id: str, after: int, want: int, first: int, types: set[str] | None
    ) -> list[Envelope]:
        """Seqs ``after+1 .. after+want`` (trimmed from Redis, which starts at ``first``)."""
        got: list[Envelope] = []
        if self.archive is not None:
            got = [e for e in await self.archive.read(session_id, after, want) if e.seq < first]
        if len(got) != want or got[0].seq != after + 1 or got[-1].seq != after + want:
            raise HistoryGone(session_id, after, got[0].seq if got else first)
        return [e for e in got if types is None or e.type in types]

    async def _decode(
        self, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]], where: str,
        types: set[str] | None = None,
    ) -> list[Envelope]:
        out = []
        for entry_id, fields in entries:
            if types is not None and entry_type(fields) not in types:
                continue
            env = decode_entry(fields, where=f"{where} {entry_id!r}")
            out.append((env, entry_has_blob(fields)))
        if any(ref for _, ref in out):
            return await self.hydrate([e for e, _ in out])
        return [e for e, _ in out]

    async def hydrate(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Replace blob references by their payloads."""
        refs = [e for e in envelopes if e.payload_ref]
        if not refs:
            return envelopes
        blob_keys = [
            self.keys.blob(self.keys.shard_of(e.session_id), e.payload_ref.removeprefix("sha256:"))
            for e in refs
            if e.payload_ref
        ]
        with redis_errors("hydrate"):
            blobs = await self.redis.mget(blob_keys)
        found: dict[str, Any] = {}
        for e, data in zip(refs, blobs, strict=True):
            if data is None:
                raise CorruptEntry(f"session {e.session_id!r} seq {e.seq}: blob missing")
            found[str(e.payload_ref)] = decode_json(data)
        return [
            msgspec.structs.replace(e, payload=found[e.payload_ref]) if e.payload_ref else e
            for e in envelopes
        ]

    async def tail(
        self,
        session_id: str,
        after: int = 0,
        *,
        batch: int = 500,
        block_ms: int = 2000,
        until_ended: bool = True,
        incarnation: str | None = None,
    ) -> AsyncIterator[Envelope]:
        """Every envelope after ``after``: catch up from history, then follow live. The seam is
        exact because both sides are cursors on seq. Stops after ``session.ended`` unless
        ``until_ended`` is False. Follows one incarnation of the session (``incarnation``, by
        default the current one; :class:`SessionNotFound` if there is none) and raises
        :class:`SessionNotFound` once it is gone, never carrying a session created again
        under the id. History gone everywhere raises :class:`HistoryGone`. Holds one Redis
        connection while blocked: for many concurrent followers use the SSE hub, which
        multiplexes (both are a :class:`~eventcore._follow.Follower`)."""
        followers = LogFollowers(self, page=batch, block_ms=block_ms)
        async with (
            followers.subscribe(session_id, after, until_ended=until_ended,
                                incarnation=incarnation) as follower,
            closing_iter(follower.envelopes()) as envelopes,
        ):
            async for env in envelopes:
                yield env

    async def last_seq(self, session_id: str) -> int:
        with redis_errors("last_seq"):
            raw = await _aw(self.redis.hget(
                self.keys.session(validate_session_id(session_id)).meta, META_SEQ
            ))
        return int(raw) if raw is not None else 0

    # -- sessions --------------------------------------------------------------------------------
    async def create_session(
        self,
        agent: str | None = None,
        *,
        session_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        input: Any = None,
        ttl_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> SessionInfo:
        """Create a session (and, with ``agent``, dispatch it atomically). Creating again with the
        same ``session_id`` or ``idempotency_key`` returns the existing session."""
        items, info = self.prepare_session(agent, session_id=session_id, labels=labels,
                                           input=input, ttl_s=ttl_s,
                                           idempotency_key=idempotency_key)
        if len(items) == 1:
            # through the shard's group commit, with whatever concurrent callers append in
            # the same tick: one script call per shard for them all, not one round trip each
            # on one of the appender's few connections (many clients creating sessions at
            # once waited for those connections)
            results = [await self.appender.append(items[0])]
        else:
            # session.created and the first input in one script call: atomically, so a
            # creation retried after a failure never finds the session without its input
            results = await self.appender.append_many(items)
        if results[0].duplicate:  # it existed: its state now, not ours
            return await self.get_session(info.session_id)
        return msgspec.structs.replace(info, last_seq=results[-1].seq,
                                       incarnation=results[0].incarnation)

    def prepare_session(
        self,
        agent: str | None = None,
        *,
        session_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        input: Any = None,
        ttl_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[list[PreparedAppend], SessionInfo]:
        """What :meth:`create_session` appends (``session.created``, then the first input), as
        prepared entries for the append script, and the new session as it will read back
        (``last_seq`` and ``incarnation`` are known once it is appended). For callers that run
        the append script inside a script of their own (the scheduler)."""
        if idempotency_key is not None:
            validate_key(idempotency_key, "idempotency_key")
            digest = hashlib.sha256(
                f"{self.settings.namespace}\0{idempotency_key}".encode()
            ).hexdigest()
            if session_id is None:
                session_id = f"s_{digest[:32]}"
        if session_id is None:
            session_id = f"s_{uuid.uuid4().hex}"
        session_id = validate_session_id(session_id)
        if agent is not None:
            validate_key(agent, "agent")
        labels = dict(labels or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValidationError("labels must map str to str")
        validate_value(labels, "labels")
        validate_value(input, "input")
        ttl = self.settings.session_ttl_s if ttl_s is None else ttl_s
        if type(ttl) is not int or ttl < 0:
            raise ValidationError(f"ttl_s must be an int >= 0 (0: keep forever), got {ttl!r:.20}")
        created = Envelope(
            type="session.created", session_id=session_id, event_key="session.created",
            payload=SessionCreatedPayload(agent=agent, labels=labels, input=input),
        )
        # the metadata's created_at is the envelope's ts, so what this returns for a new
        # session is exactly what get_session reads back (at the moment of creation)
        at = int(created.ts.timestamp() * 1000)
        aux = encode({"agent": agent or "", "labels": encode(labels).decode(), "ttl": ttl,
                      "at": at})
        items = [self.appender.prepare(created, None, aux.decode())]
        if input is not None:
            first = Envelope(type="input", session_id=session_id, event_key="session.input",
                             payload=input)
            items.append(self.appender.prepare(first))
        when = ms_datetime(at)
        return items, SessionInfo(
            session_id=session_id, state="created", agent=agent, labels=labels,
            last_seq=len(items), epoch=0, host=None, created_at=when, updated_at=when,
            ended_at=None, ttl_s=ttl,
        )

    async def incarnations(self, session_ids: Sequence[str]) -> dict[str, str | None]:
        """The current incarnation of each session (None: no such session), in one round
        trip."""
        keys = [self.keys.session(validate_session_id(sid)).meta for sid in session_ids]
        with redis_errors("incarnations"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, list(INCARNATION_FIELDS))
                raw = await pipe.execute()
        return {sid: current_incarnation(fields)
                for sid, fields in zip(session_ids, raw, strict=True)}

    async def get_session(self, session_id: str) -> SessionInfo:
        keys = self.keys.session(validate_session_id(session_id))
        with redis_errors("get_session"):
            raw = await _aw(self.redis.hgetall(keys.meta))
        if not raw:
            raise SessionNotFound(session_id)
        return session_info(session_id, raw)

    async def end_session(
        self,
        session_id: str,
        reason: str = "completed",
        *,
        error: ErrorInfo | None = None,
        epoch: int | None = None,
        ack: HostingAck | None = None,
    ) -> AppendResult:
        """Append ``session.ended`` (once: ending twice returns the first). The session's keys
        then expire after its TTL. A host passes its ``epoch`` and ``ack`` to release its
        hosting in the same step (the result is then not a duplicate)."""
        if ack is not None and epoch is None:
            raise ValidationError("releasing a hosting (ack) needs the host's epoch")
        return await self.append(
            Envelope(type="session.ended", session_id=session_id, event_key="session.ended",
                     payload=SessionEndedPayload(reason=reason, error=error)),
            epoch=epoch, aux=ack.aux() if ack is not None else "",
        )

    async def delete_session(self, session_id: str) -> bool:
        """End the session (so hosts and streams see it end), then, atomically, delete its keys
        and its projected view and put a ``session.deleted`` entry on the shard feed (so
        subscribers purge what they keep of it). False if there was no such session.

        The id may be created again afterwards: that is a new session (a new incarnation),
        sharing nothing with this one; tokens of this one do not open it."""
        keys = self.keys.session(validate_session_id(session_id))
        try:
            info = await self.get_session(session_id)
            await self.end_session(session_id, "deleted")
        except SessionNotFound:
            return False
        marker = encode(Envelope(type="session.deleted", session_id=session_id,
                                 event_key="session.deleted"))[1:]
        if self._delete_script is None:
            self._delete_script = self.redis.register_script(DELETE_LUA)
        with redis_errors("delete_session"):
            done, confirmed = await self.appender.replicated.run(
                self._delete_script, [*keys.per_session, self.keys.view(session_id), keys.feed,
                 keys.sessions],
                [info.incarnation, session_id, marker],
            )
        if done:  # acknowledged, as appends are, once replicated (then it is safe to retry)
            self.appender.replicated.check(confirmed, what="delete")
        return bool(done)

    # -- signals ---------------------------------------------------------------------------------
    async def signal(
        self,
        session_id: str,
        key: str,
        value: Any,
        *,
        summarize: bool | None = None,
        content_type: str = "application/json",
        sample: bool | None = None,
        event_key: str = "",
        run_id: str | None = None,
        epoch: int | None = None,
    ) -> AppendResult:
        """Append a ``signal`` and make it the key's latest value.

        ``summarize=True`` (or ``None`` and the value is over 4 KiB) publishes a summary (size,
        sha256, content type, bounded sample) instead of the value; the full value is kept in
        ``server_data``, which clients never receive. The sample (the first 256 characters) is
        included when the value was summarized for its size; a value summarized on request
        (sensitive) gets an empty sample unless ``sample=True``."""
        validate_key(key, "signal key")
        validate_value(value, "signal value")
        try:
            raw = value if isinstance(value, bytes) else encode(value)
        except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:
            raise ValidationError(f"signal value is not JSON-encodable: {exc}") from exc
        if summarize is None:
            summarize = len(raw) > SIGNAL_INLINE_LIMIT
            sample = summarize if sample is None else sample
        server_data = None
        if summarize:
            text = ""
            if sample:
                text = raw[: SUMMARY_SAMPLE_CHARS * 4].decode("utf-8", errors="replace")
            payload = SignalPayload(key=key, summary=SignalSummary(
                size=len(raw), sha256=hashlib.sha256(raw).hexdigest(),
                content_type=content_type, sample=text[:SUMMARY_SAMPLE_CHARS],
            ))
            server_data = {"value": value}  # bytes are kept as base64 (msgspec's JSON form)
        else:
            payload = SignalPayload(key=key, value=value)
        env = Envelope(type="signal", session_id=session_id, payload=payload,
                       event_key=event_key, run_id=run_id, server_data=server_data)
        return await self.append(env, epoch=epoch, aux=key)

    async def replay_signals(
        self, session_id: str, since_seq: int = 0, keys: Sequence[str] | None = None,
        *, page: int = 1000,
    ) -> list[Envelope]:
        """Every signal with seq > ``since_seq``, in seq order (optionally only ``keys``)."""
        if isinstance(keys, str):
            keys = [keys]
        wanted = set(keys) if keys is not None else None
        out: list[Envelope] = []
        after = since_seq
        while True:
            chunk, covered = await self._page(session_id, after, page, {"signal"})
            out += (e for e in chunk if wanted is None or decode_key(e) in wanted)
            if covered == after:
                return out
            after = covered

    async def latest_signals(
        self, session_id: str, keys: Sequence[str] | None = None
    ) -> dict[str, Envelope]:
        """The latest signal envelope of each key (or of ``keys``), in one round trip."""
        k = self.keys.session(validate_session_id(session_id)).signals
        with redis_errors("latest_signals"):
            if keys is None:
                raw = await _aw(self.redis.hgetall(k))
            else:
                values = await _aw(self.redis.hmget(k, list(keys))) if keys else []
                raw = {n.encode(): v for n, v in zip(keys, values, strict=True) if v is not None}
        out = {}
        for name, data in raw.items():
            out[name.decode()] = decode_body(data, where=f"{k} {name!r}")
        hydrated = await self.hydrate(list(out.values()))
        return dict(zip(out, hydrated, strict=True))

    # -- effects ---------------------------------------------------------------------------------
    async def effect(
        self,
        session_id: str,
        key: str,
        fn: Callable[[], Awaitable[T]],
        *,
        claim_ttl_s: float = 30.0,
        epoch: int | None = None,
        run_id: str | None = None,
    ) -> Any:
        """Run ``fn`` once per (session, key) and record its result as an ``effect`` envelope.

        Later calls (and concurrent ones, which wait) get the recorded result. Guarantee:
        *recorded* exactly once; *executed* at least once — if the caller dies between ``fn``
        finishing and the record landing, the claim expires after ``claim_ttl_s`` and the next
        caller runs ``fn`` again. A failure is recorded too: terminal failures raise
        :class:`EffectFailed` forever after, retryable ones run again on the next call."""
        return await _effects.run_effect(
            self, session_id, key, fn, claim_ttl_s=claim_ttl_s, epoch=epoch, run_id=run_id
        )

    async def effects(self, session_id: str) -> dict[str, Envelope]:
        """Every recorded effect of the session (live claims are not included)."""
        k = self.keys.session(validate_session_id(session_id)).effects
        with redis_errors("effects"):
            raw = await _aw(self.redis.hgetall(k))
        return {
            name.decode(): decode_body(data, where=k)
            for name, data in raw.items()
            if data.startswith(b"{")
        }


def decode_key(env: Envelope) -> str | None:
    payload = env.payload
    if isinstance(payload, dict):
        key = payload.get("key")
        return key if isinstance(key, str) else None
    return getattr(payload, "key", None)


def _aw(value: Awaitable[T] | T) -> Awaitable[T]:
    """redis-py types its asyncio commands as ``Awaitable[T] | T``; they are awaitables."""
    return cast(Awaitable[T], value)


def _sid(seq: int) -> str:
    return f"0-{seq}"


def _seq_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    if ms != "0" or not seq.isdigit():
        raise CorruptEntry(f"stream entry id {text!r} is not a seq id (0-<seq>)")
    return int(seq)

