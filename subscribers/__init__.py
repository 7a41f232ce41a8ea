"""Subscribers: the consumer-group runtime over the shard feeds, and the built-in subscribers.

- :class:`SubscriberRunner` runs any :class:`Subscriber` (XREADGROUP batches, ack after
  success, fenced reclaim of idle entries, dead-letter after ``max_deliveries``, NOGROUP
  recovery from the checkpoint, graceful stop, metrics).
- :class:`OrderedSubscriber` turns at-least-once deliveries into in-order, exactly-once
  application per session; :class:`Projector` (the read model, :func:`read_view`) and
  :class:`Persistence` (SQLite/PostgreSQL history, the archive for tiered replay) build on it.
- :class:`SinkSubscriber` runs any sink off the hot path; :class:`Retention` trims Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eventcore._streams import GroupState

from ._delivery import CheckpointStore, Delivery, Subscriber, decode_feed_entry
from ._metrics import SubscriberMetrics
from ._ordered import DELETED, ApplyConflict, OrderedStats, OrderedSubscriber, Position, Run
from ._projector import Projector, read_view
from ._retention import Retention, RetentionReport
from ._runtime import SubscriberRunner, default_consumer_name, is_transient
from ._sink import SinkSubscriber
from ._view import (
    MAX_RECENT_TOOL_CALLS,
    MAX_RUNS,
    EffectView,
    RunView,
    SessionView,
    SignalView,
    ToolCallView,
    apply_event,
    fold,
)

if TYPE_CHECKING:
    from ._persistence import SCHEMA_VERSION, Persistence, is_unavailable

__all__ = [
    "DELETED",
    "MAX_RECENT_TOOL_CALLS",
    "MAX_RUNS",
    "SCHEMA_VERSION",
    "ApplyConflict",
    "CheckpointStore",
    "Delivery",
    "EffectView",
    "GroupState",
    "OrderedStats",
    "OrderedSubscriber",
    "Persistence",
    "Position",
    "Projector",
    "Retention",
    "RetentionReport",
    "Run",
    "RunView",
    "SessionView",
    "SignalView",
    "SinkSubscriber",
    "Subscriber",
    "SubscriberMetrics",
    "SubscriberRunner",
    "ToolCallView",
    "apply_event",
    "decode_feed_entry",
    "default_consumer_name",
    "fold",
    "is_transient",
    "is_unavailable",
    "read_view",
]

_OPTIONAL = {"SCHEMA_VERSION", "Persistence", "is_unavailable"}


def __getattr__(name: str) -> Any:
    # Persistence needs SQLAlchemy (the ``sql`` / ``postgres`` extras): loaded on first use
    if name not in _OPTIONAL:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from eventcore._extras import import_optional

    module = import_optional("._persistence", __name__, "sql", "eventcore.subscribers.Persistence")
    value = getattr(module, name)
    globals()[name] = value
    return value
