"""Sinks: where published envelopes go.

``Sink`` is a small protocol (``async send(envelopes)``, ``async aclose()``) receiving
:class:`Published` values (envelope, stream name ``session/<id>``, seq). The publish path is
:class:`Publisher`: :class:`RedisLogSink` appends (and assigns seq), then the ``on_published``
hook and any inline sinks run. To run a sink off the hot path instead, at least once, use
``subscribers.SinkSubscriber``.
"""

from ._base import Published, Sink
from ._compose import FanoutSink, FilterSink
from ._jsonl import JsonlSink
from ._loader import ENTRY_POINT_GROUP, SinkSpec, configured_sinks, load_sink
from ._memory import MemorySink
from ._publisher import OnPublished, Publisher
from ._redis import RedisLogSink

__all__ = [
    "ENTRY_POINT_GROUP",
    "FanoutSink",
    "FilterSink",
    "JsonlSink",
    "MemorySink",
    "OnPublished",
    "Published",
    "Publisher",
    "RedisLogSink",
    "Sink",
    "SinkSpec",
    "configured_sinks",
    "load_sink",
]
