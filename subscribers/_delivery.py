"""What a subscriber receives, the plug points of the runtime, and feed-entry decoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import msgspec

from eventcore import CorruptEntry, Envelope
from eventcore._codec import decode_entry, feed_ref
from eventcore._groups import CheckpointStore

__all__ = ["CheckpointStore", "Delivery", "Subscriber", "decode_feed_entry"]


class Delivery(msgspec.Struct, frozen=True):
    """One feed entry handed to a subscriber: the envelope, where it came from, how many
    times it has been delivered (1 the first time; more after a retry or a reclaim), and the
    incarnation of the session it belongs to (``""`` when the entry does not say: written
    before incarnations existed, or built by hand).

    Immutable (a frozen ``msgspec.Struct``: built in C, one per entry on the hot path; use
    ``msgspec.structs.replace`` for a changed copy).

    ``body`` and ``server_body``: the envelope's client JSON and its ``server_data`` JSON as
    the feed entry holds them, for a subscriber that stores or forwards the envelope without
    encoding it again (``b""`` when not known: built by hand, or a payload hydrated from a
    blob, which the entry's JSON does not hold; then encode the envelope).

    Besides envelopes the feed carries ``session.deleted`` entries (not in any session
    stream): the incarnation they name was deleted (``EventLog.delete_session``)."""

    entry_id: str
    shard: int
    envelope: Envelope
    attempt: int = 1
    incarnation: str = ""
    body: bytes = b""
    server_body: bytes | None = None

    @property
    def session_id(self) -> str:
        return self.envelope.session_id

    @property
    def seq(self) -> int:
        return self.envelope.seq


@runtime_checkable
class Subscriber(Protocol):
    """A consumer-group subscriber. ``name`` is its default group name.

    ``handle`` gets a batch (entries from several shards and sessions, in feed order per shard)
    and must raise if any of it failed; the runtime then retries the entries one by one, so one
    poison entry does not hold back the rest. Deliveries are at least once: use
    :class:`~subscribers.OrderedSubscriber` for in-order, exactly-once application per session.

    A subscriber that never reads payloads (it stores or forwards each envelope's JSON, as
    :class:`~subscribers.Persistence` does) may set a class attribute ``raw_payloads = True``:
    its deliveries' envelopes then carry ``payload`` and ``server_data`` as the JSON the entry
    holds (``msgspec.Raw``, a :class:`~eventcore._codec.RawPayloadEnvelope`), not decoded. An
    envelope whose payload lives in a blob is decoded and hydrated in full all the same.
    """

    name: str

    async def handle(self, deliveries: Sequence[Delivery]) -> None: ...


def decode_feed_entry(fields: Mapping[bytes, bytes], where: str) -> Envelope:
    """The envelope of a feed entry, checked against its ``sid`` and ``seq`` fields."""
    sid, seq = feed_ref(fields)
    if sid is None or seq is None or not seq.isdigit():
        raise CorruptEntry(f"feed entry {where} has no valid 'sid'/'seq' fields")
    env = decode_entry(fields, where=where)
    if env.seq != int(seq) or env.session_id.encode() != sid:
        raise CorruptEntry(
            f"feed entry {where}: envelope says {env.session_id!r}/{env.seq}, "
            f"fields say {sid!r}/{seq!r}"
        )
    return env


def entry_ids(deliveries: Sequence[Delivery]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for d in deliveries:
        out.setdefault(d.shard, []).append(d.entry_id)
    return out
