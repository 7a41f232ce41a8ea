"""Envelopes <-> stream entry fields. The only place that knows the entry layout.

A stream entry has ``t`` (type, so readers can filter without decoding), ``d`` (the client
envelope JSON, seq included, server_data excluded), optional ``sd`` (server_data JSON),
optional ``r`` (``1`` when the payload lives in a blob) and ``inc``, the incarnation of the
session it belongs to (absent where written before incarnations, or before stream entries
carried them). Feed entries add ``sid`` and ``seq``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ._envelope import Envelope
from .errors import CorruptEntry

__all__ = ["client_json", "decode_entry", "encode", "entry_incarnation"]

_encoder = msgspec.json.Encoder()
_env_decoder = msgspec.json.Decoder(Envelope)
_any_decoder = msgspec.json.Decoder()

encode = _encoder.encode


def client_json(envelope: Envelope) -> bytes:
    """The envelope as clients see it: JSON without ``server_data``."""
    if envelope.server_data is not None:
        envelope = msgspec.structs.replace(envelope, server_data=None)
    return _encoder.encode(envelope)


def decode_json(data: bytes) -> Any:
    return _any_decoder.decode(data)


def entry_incarnation(fields: Mapping[bytes, bytes]) -> str:
    """The incarnation a stream or feed entry belongs to; ``""`` where the entry does not say."""
    return fields.get(b"inc", b"").decode(errors="replace")


def decode_entry(fields: Mapping[bytes, bytes], *, where: str = "") -> Envelope:
    """Decode one stream (or feed) entry; :class:`CorruptEntry` if it is not ours."""
    body = fields.get(b"d")
    if body is None:
        raise CorruptEntry(f"stream entry {where} has no envelope field 'd'")
    try:
        env = _env_decoder.decode(body)
        sd = fields.get(b"sd")
        if sd is not None:
            env = msgspec.structs.replace(env, server_data=_any_decoder.decode(sd))
    except (msgspec.DecodeError, RecursionError) as exc:  # nested past the C stack
        raise CorruptEntry(f"stream entry {where} is not a valid envelope: {exc}") from exc
    return env


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
        return (entry_seq(entry_id), fields[b"t"].decode(), fields[b"d"],
                entry_incarnation(fields), fields.get(b"sd"))
    except (KeyError, ValueError) as exc:
        raise CorruptEntry(f"stream entry {entry_id!r} is not an envelope entry: {exc!r}"
                           ) from exc


def entry_has_ref(fields: Mapping[bytes, bytes]) -> bool:
    """Whether the entry's payload lives in a blob (it must be hydrated before it is sent)."""
    return b"r" in fields


def entry_size(fields: Mapping[bytes, bytes]) -> int:
    """The bytes an entry holds (what a follower's page budget counts)."""
    return sum(len(k) + len(v) for k, v in fields.items())


def decode_envelope(data: bytes, server_data: bytes | None) -> Envelope:
    """An envelope from its client JSON and its server_data JSON (``None``: it has none)."""
    env = _env_decoder.decode(data)
    if server_data is not None:
        env = msgspec.structs.replace(env, server_data=_any_decoder.decode(server_data))
    return env
