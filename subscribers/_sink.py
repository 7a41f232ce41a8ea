"""Any sink as a consumer-group subscriber: off the hot path, at least once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventcore.sinks import Published, Sink, load_sink

from ._delivery import Delivery

__all__ = ["SinkSubscriber"]


class SinkSubscriber:
    """Runs a sink behind a :class:`~subscribers.SubscriberRunner`: each batch of feed entries
    is sent to the sink and acknowledged once ``send`` returns.

    At least once: an entry whose ``send`` failed is sent again (with backoff; the runner
    retries the batch's entries one by one so one poison envelope cannot block the others, and
    dead-letters it after ``max_deliveries``), and a crashed consumer's entries are re-sent by
    whoever reclaims them. A sink sees each session's envelopes in seq order within a batch;
    across batches and consumers, dedupe on ``(session_id, seq)`` if it matters.

    ``sink`` is a sink object, or anything :func:`sinks.load_sink` accepts (with ``options``).
    """

    def __init__(self, sink: Sink | str, *, name: str = "sink", **options: Any) -> None:
        self.sink = load_sink(sink, **options)
        self.name = name

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        await self.sink.send([Published.of(d.envelope) for d in deliveries])

    async def aclose(self) -> None:
        await self.sink.aclose()
