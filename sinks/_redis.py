"""The Redis log sink: the one sink that assigns seq (everything else receives what it assigned)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import msgspec

from eventcore import Envelope, EventLog

from ._base import Published

__all__ = ["RedisLogSink"]


def keyed(envelope: Envelope) -> Envelope:
    """Give an envelope without an event key a random one *before* it is appended, so the caller
    can retry exactly this envelope and the log keeps it once."""
    if envelope.event_key:
        return envelope
    return msgspec.structs.replace(envelope, event_key=uuid.uuid4().hex)


class RedisLogSink:
    """Appends envelopes to the session log (one script call per shard for a batch).

    :meth:`publish` is the publish path: it returns each envelope with its stream and seq.
    :meth:`send` makes it usable as an ordinary sink too, for example to mirror published
    envelopes into another namespace or deployment: event keys travel along, so a redelivered
    envelope is kept once there as well (the seq there is assigned by that log).
    """

    def __init__(self, log: EventLog, *, epoch: int | None = None) -> None:
        self.log = log
        self.epoch = epoch

    async def publish(
        self, envelopes: Sequence[Envelope], *, epoch: int | None = None
    ) -> list[Published]:
        """Append and return where each envelope landed, in the order given.

        Refusals (:class:`~eventcore.SessionNotFound`, :class:`~eventcore.StaleHost`, ...) are
        raised after the whole batch was processed; retrying the same envelopes is safe."""
        if not envelopes:
            return []
        batch = [keyed(e) for e in envelopes]
        results = await self.log.append_many(batch, epoch=self.epoch if epoch is None else epoch)
        return [
            Published(msgspec.structs.replace(env, seq=res.seq, event_key=res.event_key),
                      env.stream, res.seq, res.duplicate)
            for env, res in zip(batch, results, strict=True)
        ]

    async def send(self, envelopes: Sequence[Published]) -> None:
        await self.publish([msgspec.structs.replace(p.envelope, seq=0) for p in envelopes])

    async def aclose(self) -> None:
        """The log belongs to the caller; nothing to release here."""
