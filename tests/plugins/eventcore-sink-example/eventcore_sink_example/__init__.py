"""A minimal third-party sink: counts envelopes per type. Registered as ``example`` in the
``eventcore.sinks`` entry-point group (see this package's pyproject.toml)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


class CountingSink:
    def __init__(self, label: str = "example") -> None:
        self.label = label
        self.counts: Counter[str] = Counter()
        self.closed = False

    async def send(self, envelopes: Sequence[Any]) -> None:
        self.counts.update(p.envelope.type for p in envelopes)

    async def aclose(self) -> None:
        self.closed = True
