"""Every Redis key and channel name eventcore uses is built here (and nowhere else); the
fields inside the keys are named in :mod:`eventcore._layout`.

Layout (``ns`` is the namespace, ``{N}`` the shard hash tag)::

    ns:{N}:session/<id>      the session's event stream, entry id 0-<seq>
    ns:{N}:meta:<id>         hash: state, agent, labels, seq, epoch, host, timestamps, ttl
    ns:{N}:dedupe:<id>       hash: event_key -> seq
    ns:{N}:signals:<id>      hash: signal key -> {"seq", "value"} JSON (latest value per key)
    ns:{N}:effects:<id>      hash: effect key -> recorded result JSON, or a live claim
    ns:{N}:lease:<id>        string: the host's lease (worker id), PX = lease TTL
    ns:{N}:view:<id>         hash: the projector's read model of the session (seq, v = JSON)
    ns:{N}:feed              stream: every envelope appended in the shard (consumer groups)
    ns:{N}:dispatch          stream: "host this session" jobs (group ``workers``); also the
                             name of a pub/sub channel: "<session_id>" after each dispatch
                             entry (prelude.lua's ec_dispatch), the doorbell of the workers'
                             cluster reads (eventcore._doorbell)
    ns:{N}:delayed           zset: dispatch jobs waiting for a retry, scored by due time (ms)
    ns:{N}:dead              stream: dead-lettered jobs and poison feed entries
    ns:{N}:blob:<sha256>     string: a large payload, stored once per content
    ns:{N}:batch:<token>     string: an append batch's results (minutes), so a resent batch is
                             answered from it instead of appending twice
    ns:{N}:incarnation       string: the last incarnation issued in the shard (16 digits,
                             increasing): a session id created again is a new incarnation
    ns:{N}:schedule:<id>     hash: a schedule (eventcore._schedules): definition JSON, revision,
                             enabled, next / last occurrence, last session, counters
    ns:{N}:schedules         zset: the shard's schedule ids scored by their next occurrence (ms;
                             +inf while disabled): what the scheduler polls
    ns:{N}:sessions          zset: session id -> its incarnation (as a number: microseconds,
                             increasing per shard), written by the script that creates the
                             session, removed by the one that deletes it (the listing index)
    ns:{N}:epoch             hash: the shard's write counter (wc, one per append batch) and
                             generation (gen): how appends detect a failover that lost writes
    ns:{0}:shards            string: the deployment's shard count (checked at every start)
    ns:{presence}:hosts      hash: worker id -> "<run id> <client id> <server run id>
                             <expires ms> alive|evicted": each worker's presence connection
                             (workers._presence), in one slot of its own
    ns:{N}:notify            pub/sub channel: "<session_id> <last_seq>" per session appended
                             to, one message per script call (one note a line)
    ns:{N}:wake              pub/sub channel: the same, only after appends made without a host
                             epoch (inputs, signals, control, ends from outside) to a session
                             that has a host: what a host must react to, without hearing of its
                             own writes (an unhosted session's next claim reads its stream)

The shard hash tag puts every key of a session, its shard's feed and its shard's dispatch stream
in one Redis Cluster slot, so one Lua script may touch them all atomically. The namespace is
validated to contain no ``{`` so the shard tag is always the first braced part of the name.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from .errors import ConfigError, ValidationError

__all__ = ["Keys", "SessionKeys", "validate_key", "validate_session_id"]

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
MAX_KEY_BYTES = 512


def validate_session_id(session_id: object) -> str:
    """Session ids are 1-128 chars of ``[A-Za-z0-9._:-]``, starting alphanumeric.

    A narrow alphabet keeps ids safe in key names, URLs, SSE ids, file names and logs.
    """
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        shown = repr(session_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ValidationError(
            f"invalid session id {shown}: use 1-128 characters of A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit"
        )
    return session_id


def validate_key(key: object, what: str = "key") -> str:
    """Signal, effect, event and idempotency keys: any valid UTF-8 text of 1-512 bytes."""
    if not isinstance(key, str) or not key:
        raise ValidationError(f"{what} must be a non-empty string, got {key!r:.80}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{what} is not valid UTF-8 text: {key!r:.80}") from exc
    if size > MAX_KEY_BYTES:
        raise ValidationError(f"{what} is {size} bytes; the limit is {MAX_KEY_BYTES}")
    if "\x00" in key:
        raise ValidationError(f"{what} must not contain NUL characters")
    return key


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The keys one session owns, plus its shard's shared streams."""

    session_id: str
    shard: int
    stream: str
    meta: str
    dedupe: str
    signals: str
    effects: str
    lease: str
    feed: str
    dispatch: str
    notify: str
    wake: str
    incarnation: str
    sessions: str

    @property
    def per_session(self) -> tuple[str, ...]:
        """Keys deleted or expired with the session."""
        return (self.stream, self.meta, self.dedupe, self.signals, self.effects, self.lease)


class Keys:
    """Builds key names for one namespace and shard count."""

    __slots__ = ("_shard_names", "namespace", "shards")

    def __init__(self, namespace: str = "ec", shards: int = 16) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(
                f"namespace {namespace!r} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            )
        if not 1 <= shards <= 16384:
            raise ConfigError(f"shards must be between 1 and 16384, got {shards}")
        self.namespace = namespace
        self.shards = shards
        # per shard: its tag and the shard-level names a SessionKeys carries (built once)
        self._shard_names: dict[int, tuple[str, ...]] = {}

    def shard_of(self, session_id: str) -> int:
        return zlib.crc32(session_id.encode("utf-8")) % self.shards

    def _tag(self, shard: int) -> str:
        return f"{self.namespace}:{{{shard}}}"

    def session(self, session_id: str) -> SessionKeys:
        shard = self.shard_of(session_id)
        names = self._shard_names.get(shard)
        if names is None:
            t = self._tag(shard)
            names = self._shard_names[shard] = (
                t, self.feed(shard), self.dispatch(shard), self.notify(shard), self.wake(shard),
                f"{t}:incarnation", self.sessions(shard))
        t, feed, dispatch, notify, wake, incarnation, sessions = names
        # positional, in the fields' order (keywords cost twice as much, on the hot path of
        # every new session in clients and workers)
        return SessionKeys(
            session_id, shard, f"{t}:session/{session_id}", f"{t}:meta:{session_id}",
            f"{t}:dedupe:{session_id}", f"{t}:signals:{session_id}",
            f"{t}:effects:{session_id}", f"{t}:lease:{session_id}",
            feed, dispatch, notify, wake, incarnation, sessions,
        )

    def view(self, session_id: str) -> str:
        """The projector's read model of a session, in the session's slot."""
        return f"{self._tag(self.shard_of(session_id))}:view:{session_id}"

    def feed(self, shard: int) -> str:
        return f"{self._tag(shard)}:feed"

    def dispatch(self, shard: int) -> str:
        return f"{self._tag(shard)}:dispatch"

    def dispatched(self, shard: int) -> str:
        """Pub/sub channel: a dispatch entry was added to ``dispatch(shard)``. Named as the
        stream itself (channels and keys are apart in Redis; same slot): every script that
        adds one (append, release, requeue, delayed) publishes on the key it was given, so
        none needs another argument. Only Redis Cluster deployments listen (the doorbell of
        cluster group reads); append skips the publish for a single-node client, whose readers
        block on XREADGROUP."""
        return self.dispatch(shard)

    def delayed(self, shard: int) -> str:
        return f"{self._tag(shard)}:delayed"

    def dead(self, shard: int) -> str:
        return f"{self._tag(shard)}:dead"

    def notify(self, shard: int) -> str:
        return f"{self._tag(shard)}:notify"

    def wake(self, shard: int) -> str:
        return f"{self._tag(shard)}:wake"

    def blob(self, shard: int, digest: str) -> str:
        return f"{self._tag(shard)}:blob:{digest}"

    def batch(self, shard: int, token: str) -> str:
        return f"{self._tag(shard)}:batch:{token}"

    def sessions(self, shard: int) -> str:
        """Zset: the shard's sessions, scored by incarnation (the listing index)."""
        return f"{self._tag(shard)}:sessions"
    def epoch(self, shard: int) -> str:
        """The shard's write counter and generation (``_layout.SHARD_*``)."""
        return f"{self._tag(shard)}:epoch"

    def all_shards(self) -> range:
        return range(self.shards)

    # Process-wide keys (not per shard): registries and checkpoints.
    def worker(self, worker_id: str) -> str:
        return f"{self.namespace}:worker:{worker_id}"

    def workers(self) -> str:
        return f"{self.namespace}:workers"

    def presence(self) -> str:
        """Hash: worker id -> its presence registration (the Redis client id of a connection
        the worker holds open while it lives). One key in a slot of its own (``{presence}``):
        on a cluster every worker keeps that connection to the one master serving it, and one
        ``CLIENT LIST`` there tells which registered workers' connections are gone."""
        return f"{self.namespace}:{{presence}}:hosts"

    def checkpoint(self, group: str, shard: int) -> str:
        return f"{self._tag(shard)}:checkpoint:{group}"

    def applied(self, group: str, shard: int) -> str:
        """Hash: session_id -> last seq applied by ``group`` (exactly-once application)."""
        return f"{self._tag(shard)}:applied:{group}"

    def reclaim_lock(self, group: str, shard: int) -> str:
        return f"{self._tag(shard)}:reclaimer:{group}"

    def session_pattern(self) -> str:
        """SCAN pattern matching every session stream of the namespace."""
        return f"{self.namespace}:{{*}}:session/*"

    def shard_count(self) -> str:
        """String: the deployment's shard count, set by the first process to start. In shard
        0's slot (shard 0 exists whatever the count): a known slot, which scripts of shard 0
        may read, and outside the ``session_pattern``."""
        return f"{self._tag(0)}:shards"

    # Schedules (eventcore._schedules): a schedule lives on the shard of its id, and the
    # sessions it starts are given ids on that same shard, so firing one occurrence (advance the
    # schedule, create the session) is one script in one cluster slot.
    def schedule_shard(self, schedule_id: str) -> int:
        return self.shard_of(schedule_id)

    def schedule(self, schedule_id: str) -> str:
        """Hash: one schedule's definition and firing state, in its shard's slot."""
        return f"{self._tag(self.schedule_shard(schedule_id))}:schedule:{schedule_id}"

    def schedules(self, shard: int) -> str:
        """Zset: the shard's schedule ids, scored by their next occurrence (epoch ms)."""
        return f"{self._tag(shard)}:schedules"
