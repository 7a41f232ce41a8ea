"""Envelopes and records <-> the fields Redis holds. The only Python module that reads or
writes raw stream, hash and dead-letter fields; their names are in :mod:`eventcore._layout`.

A stream entry has ``t`` (type, so readers can filter without decoding), ``d`` (the client
envelope JSON, seq included, server_data excluded), optional ``sd`` (server_data JSON),
optional ``r`` (``1`` when the payload lives in a blob) and ``inc``, the incarnation of the
session it belongs to (absent where written before incarnations, or before stream entries
carried them). Feed entries add ``sid`` and ``seq``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from . import _layout as L
from ._envelope import Envelope, ErrorInfo
from ._sessions import SessionInfo, ms_datetime
from .errors import CorruptEntry

__all__ = [
    "DeadLetterRecord",
    "RawPayloadEnvelope",
    "body_fields",
    "client_json",
    "decode_body",
    "decode_dead_letter",
    "decode_entry",
    "decode_envelope",
    "dispatch_session",
    "encode",
    "entry_bodies",
    "entry_client_event",
    "entry_generation",
    "entry_has_blob",
    "entry_incarnation",
    "entry_seq",
    "entry_size",
    "entry_type",
    "feed_parts",
    "feed_ref",
    "fields_of",
    "seq_id",
    "session_info",
    "session_started_parts",
    "subscriber_dead_letter",
]

_encoder = msgspec.json.Encoder()
_env_decoder = msgspec.json.Decoder(Envelope)
_any_decoder = msgspec.json.Decoder()

encode = _encoder.encode

_T = L.ENTRY_TYPE.encode()
_D = L.ENTRY_BODY.encode()
_SD = L.ENTRY_SERVER_DATA.encode()
_R = L.ENTRY_BLOB.encode()
_INC = L.ENTRY_INCARNATION.encode()
_GEN = L.ENTRY_GENERATION.encode()
_FEED_SID = L.FEED_SESSION.encode()
_FEED_SEQ = L.FEED_SEQ.encode()
_DISPATCH_SID = L.DISPATCH_SESSION.encode()


def client_json(envelope: Envelope) -> bytes:
    """The envelope as clients see it: JSON without ``server_data``."""
    if envelope.server_data is not None:
        envelope = msgspec.structs.replace(envelope, server_data=None)
    return _encoder.encode(envelope)


def decode_json(data: bytes) -> Any:
    return _any_decoder.decode(data)


# -- session stream and feed entries -----------------------------------------------------------
def entry_incarnation(fields: Mapping[bytes, bytes]) -> str:
    """The incarnation a stream or feed entry belongs to; ``""`` where the entry does not say."""
    return fields.get(_INC, b"").decode(errors="replace")


def entry_generation(fields: Mapping[bytes, bytes]) -> tuple[str, int | None]:
    """The stream epoch's generation a session-stream entry was appended in (``""``: 0, the
    entry does not say) and the seq its history is known good up to (``None``: unknown)."""
    raw = fields.get(_GEN)
    if raw is None:
        return "", None
    gen, _, good = raw.decode(errors="replace").partition(":")
    return gen, int(good) if good.isdigit() else None


def entry_type(fields: Mapping[bytes, bytes]) -> str:
    """The entry's event type, read without decoding its JSON (``""`` when it has none)."""
    return fields.get(_T, b"").decode(errors="replace")


def entry_has_blob(fields: Mapping[bytes, bytes]) -> bool:
    """Whether the entry's payload lives in a blob (the envelope needs hydrating)."""
    return _R in fields


def entry_client_json(fields: Mapping[bytes, bytes]) -> tuple[str, bytes]:
    """(type, client envelope JSON) of an entry, as stored: forwarded without decoding."""
    return fields[_T].decode(), fields[_D]


def entry_bodies(fields: Mapping[bytes, bytes]) -> tuple[bytes, bytes | None]:
    """(client envelope JSON, server_data JSON or None) of an entry, as stored: what a copy of
    the envelope keeps without encoding it again."""
    return fields.get(_D, b""), fields.get(_SD)


def body_fields(body: bytes, server_data: bytes | None = None) -> dict[bytes, bytes]:
    """The fields of an entry holding this envelope JSON (and server_data JSON)."""
    fields = {_D: body}
    if server_data is not None:
        fields[_SD] = server_data
    return fields


def decode_body(body: bytes, *, where: str = "") -> Envelope:
    """Decode an envelope stored as JSON alone (signal and effect hashes, the archive)."""
    return decode_entry({_D: body}, where=where)


def decode_entry(fields: Mapping[bytes, bytes], *, where: str = "") -> Envelope:
    """Decode one stream (or feed) entry; :class:`CorruptEntry` if it is not ours."""
    body = fields.get(_D)
    if body is None:
        raise CorruptEntry(f"stream entry {where} has no envelope field {L.ENTRY_BODY!r}")
    try:
        env = _env_decoder.decode(body)
        sd = fields.get(_SD)
        if sd is not None:
            env = msgspec.structs.replace(env, server_data=_any_decoder.decode(sd))
    except (msgspec.DecodeError, RecursionError) as exc:  # nested past the C stack
        raise CorruptEntry(f"stream entry {where} is not a valid envelope: {exc}") from exc
    return env


def feed_ref(fields: Mapping[bytes, bytes]) -> tuple[bytes | None, bytes | None]:
    """The (session id, seq) fields of a feed entry, as stored (None where absent)."""
    return fields.get(_FEED_SID), fields.get(_FEED_SEQ)


def fields_of(fields: Mapping[bytes, bytes] | list[bytes]) -> Mapping[bytes, bytes]:
    """An entry's fields as a mapping, given as one or as Redis's flat ``[field, value, ...]``
    list."""
    if isinstance(fields, list):
        it = iter(fields)
        return dict(zip(it, it, strict=False))
    return fields


class RawPayloadEnvelope(Envelope, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """An envelope decoded without its payload: ``payload`` is the JSON the entry holds, as
    it is (:class:`msgspec.Raw`; encoding the envelope writes it back unchanged), and so is
    ``server_data`` when there is one. What ``feed_parts(..., raw_payloads=True)`` returns,
    for a subscriber that stores or forwards envelopes and never reads their payloads (no
    payload objects built, nor tracked by the cyclic collector: these hold no containers)."""

    payload: msgspec.Raw = msgspec.Raw(b"null")


_raw_env_decoder = msgspec.json.Decoder(RawPayloadEnvelope)
# the two flat layouts the append script writes for an envelope with neither server_data nor
# a blob: sid, seq, [inc,] t, d (every other field name, as a list, at the even positions)
_FLAT_INC = [_FEED_SID, _FEED_SEQ, _INC, _T, _D]
_FLAT = [_FEED_SID, _FEED_SEQ, _T, _D]
# incarnations as text: a few per session, seen in every entry
_incarnations: dict[bytes, str] = {}


def _incarnation(raw: bytes) -> str:
    text = _incarnations.get(raw)
    if text is None:
        if len(_incarnations) >= 4096:
            _incarnations.clear()
        text = _incarnations[raw] = raw.decode(errors="replace")
    return text


def feed_parts(fields: Mapping[bytes, bytes] | list[bytes], *, raw_payloads: bool = False
               ) -> tuple[Envelope, bytes, bytes | None, str, bool]:
    """A feed entry in one pass (the subscribers' hot path): its envelope (checked against its
    ``sid`` and ``seq`` fields, as a subscriber's ``decode_feed_entry`` does), client JSON,
    server_data JSON (None: none), incarnation (``""``: the entry does not say) and whether its
    payload lives in a blob. :class:`CorruptEntry` (not naming the entry) where
    ``decode_feed_entry`` raises it.

    ``raw_payloads``: the envelope is a :class:`RawPayloadEnvelope` (payload and server_data
    left as JSON), except where the payload lives in a blob (decoded in full: hydrating
    replaces it).

    ``fields`` may be Redis's flat ``[field, value, ...]`` list: the two layouts the append
    script writes for an envelope with neither server_data nor a blob (sid, seq, [inc,] t, d)
    are read by position, anything else through a dict."""
    sid: bytes | None
    seq: bytes | None
    body: bytes | None
    sd: bytes | None
    inc: bytes | None
    if isinstance(fields, list):
        names = fields[::2]
        if names == _FLAT_INC:
            _, sid, _, seq, _, inc, _, _, _, body = fields
        elif names == _FLAT:
            _, sid, _, seq, _, _, _, body = fields
            inc = None
        else:
            return feed_parts(fields_of(fields), raw_payloads=raw_payloads)
        sd, blob = None, False
    else:
        get = fields.get
        sid, seq, body, sd, inc = get(_FEED_SID), get(_FEED_SEQ), get(_D), get(_SD), get(_INC)
        blob = _R in fields
    if sid is None or seq is None or body is None or not seq.isdigit():
        raise CorruptEntry("feed entry has no valid 'sid'/'seq'/envelope fields")
    env: Envelope
    try:
        if raw_payloads and not blob:
            env = _raw_env_decoder.decode(body)
            if sd is not None:
                env = msgspec.structs.replace(env, server_data=msgspec.Raw(sd))
        else:
            env = _env_decoder.decode(body)
            if sd is not None:
                env = msgspec.structs.replace(env, server_data=_any_decoder.decode(sd))
    except (msgspec.DecodeError, RecursionError) as exc:
        raise CorruptEntry(f"feed entry is not a valid envelope: {exc}") from exc
    if env.seq != int(seq) or env.session_id.encode() != sid:
        raise CorruptEntry("feed entry: envelope and fields disagree")
    return (env, body, sd,
            "" if inc is None else (_incarnations.get(inc) or _incarnation(inc)), blob)


_AGENT = b'{"agent":"'


def session_started_parts(session_id: str) -> tuple[bytes, bytes]:
    """The ``session.started`` envelope as the append script takes it (without seq and opening
    brace), split where the claim script puts in the agent, which only it reads: (head,
    tail). Its type is its event key too: a re-hosting dedupes to the first one."""
    body = encode(Envelope(type=L.SESSION_STARTED, session_id=session_id, payload={"agent": ""},
                           event_key=L.SESSION_STARTED))[1:]
    cut = body.rindex(_AGENT + b'"') + len(_AGENT)
    return body[:cut], body[cut:]


# -- dispatch entries --------------------------------------------------------------------------
def dispatch_session(fields: Mapping[bytes, bytes]) -> str:
    """The session id a dispatch entry names (``""`` when it names none)."""
    return fields.get(_DISPATCH_SID, b"").decode(errors="replace")


# -- the session meta hash ---------------------------------------------------------------------
def _ts(raw: bytes | None) -> _dt.datetime | None:
    if not raw:
        return None
    return ms_datetime(int(raw))


def session_info(session_id: str, raw: Mapping[bytes, bytes]) -> SessionInfo:
    """A session's metadata from its ``HGETALL``; :class:`CorruptEntry` when malformed."""
    def get(name: str, default: bytes = b"") -> bytes:
        return raw.get(name.encode(), default)

    try:
        state = get(L.META_STATE).decode()
        if state not in L.STATES:
            raise ValueError(f"unknown state {state!r}")
        host = raw.get(L.META_HOST.encode())
        return SessionInfo(
            session_id=session_id,
            state=state,  # type: ignore[arg-type]
            agent=get(L.META_AGENT).decode() or None,
            labels=msgspec.json.decode(get(L.META_LABELS, b"{}"), type=dict[str, str]),
            last_seq=int(get(L.META_SEQ, b"0")),
            epoch=int(get(L.META_EPOCH, b"0")),
            host=host.decode() if host else None,
            created_at=_ts(raw.get(L.META_CREATED_AT.encode())),
            updated_at=_ts(raw.get(L.META_UPDATED_AT.encode())),
            ended_at=_ts(raw.get(L.META_ENDED_AT.encode())),
            ttl_s=int(get(L.META_TTL, b"0")),
            incarnation=get(L.META_INCARNATION).decode(),
        )
    except (ValueError, msgspec.DecodeError) as exc:
        raise CorruptEntry(f"session {session_id!r} metadata is malformed: {exc}") from exc


# -- dead letters ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of a shard's dead-letter stream, of either kind.

    ``kind`` ``session``: a worker gave up hosting ``session_id`` (``agent``, ``attempts``,
    ``worker``, ``at_ms``; ``entry`` is its dispatch entry). ``kind`` ``subscriber``: consumer
    group ``group`` gave up on feed entry ``entry`` of ``feed`` after ``attempts`` deliveries;
    ``fields`` are that entry's fields.
    """

    entry_id: str
    kind: str
    error: ErrorInfo
    entry: str
    session_id: str = ""
    agent: str = ""
    attempts: int = 1
    worker: str = ""
    at_ms: int = 0
    group: str = ""
    feed: str = ""
    fields: Mapping[bytes, bytes] | None = None


def _error(raw: bytes) -> ErrorInfo:
    try:
        return msgspec.json.decode(raw, type=ErrorInfo)
    except msgspec.MsgspecError:
        return ErrorInfo(type="Error", message=raw.decode(errors="replace"))


def decode_dead_letter(entry_id: bytes | str, f: Mapping[bytes, bytes]) -> DeadLetterRecord | None:
    """Decode one dead-letter record; None when it is neither kind (not ours).

    Records written before they carried ``kind`` are read too: a worker's had ``sid``, a
    subscriber's ``group``."""
    def get(name: str, default: bytes = b"") -> bytes:
        return f.get(name.encode(), default)

    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    kind = get(L.DEAD_KIND).decode(errors="replace")
    if not kind:  # an older record
        if L.DEAD_SESSION.encode() in f:
            kind = L.DEAD_KIND_SESSION
        elif L.DEAD_GROUP.encode() in f:
            kind = L.DEAD_KIND_SUBSCRIBER
    raw_error = f.get(L.DEAD_ERROR.encode())
    if raw_error is None:
        return None
    try:
        if kind == L.DEAD_KIND_SESSION:
            sid = f.get(L.DEAD_SESSION.encode())
            if sid is None:
                return None
            return DeadLetterRecord(
                entry_id=eid, kind=kind, error=_error(raw_error),
                entry=get(L.DEAD_ENTRY).decode(), session_id=sid.decode(),
                agent=get(L.DEAD_AGENT).decode(), attempts=int(get(L.DEAD_ATTEMPTS, b"1")),
                worker=get(L.DEAD_WORKER).decode(), at_ms=int(get(L.DEAD_AT, b"0")))
        if kind == L.DEAD_KIND_SUBSCRIBER:
            prefix = L.DEAD_FIELD_PREFIX.encode()
            return DeadLetterRecord(
                entry_id=eid, kind=kind, error=_error(raw_error),
                entry=get(L.DEAD_ENTRY).decode(), attempts=int(get(L.DEAD_DELIVERIES, b"1")),
                worker=get(L.DEAD_CONSUMER).decode(), group=get(L.DEAD_GROUP).decode(),
                feed=get(L.DEAD_FEED).decode(),
                fields={k[len(prefix):]: v for k, v in f.items() if k.startswith(prefix)})
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def subscriber_dead_letter(
    *, group: str, consumer: str, feed: str, entry_id: str, deliveries: int,
    error: ErrorInfo, fields: Mapping[bytes, bytes], kind: str = L.DEAD_KIND_SUBSCRIBER,
) -> dict[str | bytes, Any]:
    """The dead-letter record of a feed entry a consumer group gave up on."""
    record: dict[str | bytes, Any] = {
        L.DEAD_KIND: kind, L.DEAD_GROUP: group, L.DEAD_CONSUMER: consumer,
        L.DEAD_FEED: feed, L.DEAD_ENTRY: entry_id, L.DEAD_DELIVERIES: str(deliveries),
        L.DEAD_ERROR: encode(error),
    }
    prefix = L.DEAD_FIELD_PREFIX.encode()
    for name, value in fields.items():
        record[prefix + name] = value
    return record


# follower decoders
def entry_seq(entry_id: bytes | str) -> int:
    """The seq a stream entry id (``0-<seq>``) names."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2])


def seq_id(seq: int | None) -> str:
    """The stream entry id of ``seq``: what XRANGE and XREAD take as a cursor."""
    return f"0-{seq or 0}"


def entry_client_event(entry_id: bytes, fields: Mapping[bytes, bytes]
                       ) -> tuple[int, str, bytes, str, bytes | None]:
    """Seq, type, client JSON, incarnation and server_data JSON of an entry whose payload is
    inline, taken from the entry as they are (no JSON decoding: the followers' fast path)."""
    try:
        return (entry_seq(entry_id), fields[_T].decode(), fields[_D],
                entry_incarnation(fields), fields.get(_SD))
    except (KeyError, ValueError) as exc:
        raise CorruptEntry(f"stream entry {entry_id!r} is not an envelope entry: {exc!r}"
                           ) from exc


def entry_size(fields: Mapping[bytes, bytes]) -> int:
    """The bytes an entry holds (what a follower's page budget counts)."""
    return sum(len(k) + len(v) for k, v in fields.items())


def decode_envelope(data: bytes, server_data: bytes | None) -> Envelope:
    """An envelope from its client JSON and its server_data JSON (``None``: it has none)."""
    env = _env_decoder.decode(data)
    if server_data is not None:
        env = msgspec.structs.replace(env, server_data=_any_decoder.decode(server_data))
    return env
