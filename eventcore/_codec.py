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
