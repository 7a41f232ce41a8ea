"""The layout of what eventcore stores in Redis: every field name of its stream entries and
hashes, and the event types the runtime itself writes, each named once.

Key *names* are built in :mod:`eventcore._keys`; what is *inside* those keys is named here.
Python reads and writes the fields only through :mod:`eventcore._codec`; the Lua scripts get
the same names from :func:`eventcore._scripts.lua_layout`, which turns this module into the
constants of the shared prelude (``L.ENTRY_TYPE`` ...), so both sides share one source.

Session stream entry (id ``0-<seq>``)::

    inc   the session's incarnation (absent on entries written before incarnations)
    t     event type (readers filter without decoding JSON)
    d     the client envelope JSON, seq included, server_data excluded
    sd    server_data JSON (optional)
    r     "1" when the payload lives in a blob (optional)

Feed entry (auto id): ``sid`` and ``seq`` first, then the session entry's fields.
Dispatch entry: ``sid``, ``reason`` (created, input, retry, handback, requeue).
Dead-letter record: ``kind`` (``session``: a worker gave up hosting a session; ``subscriber``:
a consumer group gave up on a feed entry) and the kind's fields, listed below.
"""

from __future__ import annotations

from typing import Final

# -- session stream entries (and the feed, which carries the same fields) ----------------------
ENTRY_INCARNATION: Final = "inc"
ENTRY_TYPE: Final = "t"
ENTRY_BODY: Final = "d"
ENTRY_SERVER_DATA: Final = "sd"
ENTRY_BLOB: Final = "r"
# "<generation>:<seq the generation's history is known good up to>" on session-stream entries
# appended after a divergence was detected (absent before: generation 0); see _lua/append.lua
ENTRY_GENERATION: Final = "g"

# -- feed entries: these, then the entry's fields ----------------------------------------------
FEED_SESSION: Final = "sid"
FEED_SEQ: Final = "seq"

# -- dispatch entries --------------------------------------------------------------------------
DISPATCH_SESSION: Final = "sid"
DISPATCH_REASON: Final = "reason"

# -- the session's meta hash -------------------------------------------------------------------
META_STATE: Final = "state"
META_AGENT: Final = "agent"
META_LABELS: Final = "labels"
META_SEQ: Final = "seq"
META_EPOCH: Final = "epoch"
META_HOST: Final = "host"
META_CREATED_AT: Final = "created_at"
META_UPDATED_AT: Final = "updated_at"
META_ENDED_AT: Final = "ended_at"
META_TTL: Final = "ttl"
META_INCARNATION: Final = "inc"
META_DISPATCHED: Final = "dispatched"
META_ATTEMPT: Final = "attempt"
META_DEAD: Final = "dead"
META_ERROR: Final = "error"
META_CHECKPOINT: Final = "checkpoint"
# the stream epoch's generation ('' = 0) and the lowest seq any of its bumps found as the tail
META_GENERATION: Final = "gen"
META_GENERATION_FROM: Final = "genf"

# -- the shard's epoch hash: its write counter and its generation ------------------------------
SHARD_WRITES: Final = "wc"
SHARD_GENERATION: Final = "gen"

# session states (META_STATE)
STATE_CREATED: Final = "created"
STATE_ACTIVE: Final = "active"
STATE_IDLE: Final = "idle"
STATE_ENDED: Final = "ended"
STATES: Final = (STATE_CREATED, STATE_ACTIVE, STATE_IDLE, STATE_ENDED)

# -- the projector's view hash -----------------------------------------------------------------
VIEW_SEQ: Final = "seq"
VIEW_VALUE: Final = "v"
VIEW_INCARNATION: Final = "inc"

# -- dead-letter records -----------------------------------------------------------------------
DEAD_KIND: Final = "kind"
DEAD_KIND_SESSION: Final = "session"
DEAD_KIND_SUBSCRIBER: Final = "subscriber"
DEAD_ERROR: Final = "error"  # ErrorInfo JSON, both kinds
DEAD_ENTRY: Final = "entry"  # the dispatch entry (session) or the feed entry (subscriber)
# kind session
DEAD_SESSION: Final = "sid"
DEAD_AGENT: Final = "agent"
DEAD_ATTEMPTS: Final = "attempts"
DEAD_WORKER: Final = "worker"
DEAD_AT: Final = "at"
# kind subscriber
DEAD_GROUP: Final = "group"
DEAD_CONSUMER: Final = "consumer"
DEAD_FEED: Final = "feed"
DEAD_DELIVERIES: Final = "deliveries"
DEAD_FIELD_PREFIX: Final = "f."  # the feed entry's own fields, each under f.<name>

# -- a schedule's hash (eventcore._schedules) ---------------------------------------------------
SCHEDULE_DEFINITION: Final = "def"  # the definition JSON (cron, timezone, agent, input, ...)
SCHEDULE_REVISION: Final = "rev"  # bumped by every change of the definition or of enabled
SCHEDULE_ENABLED: Final = "enabled"  # "1" or "0"
SCHEDULE_NEXT: Final = "next"  # the next occurrence, epoch ms ("" while disabled)
SCHEDULE_LAST_RUN: Final = "last_run"  # the occurrence fired last, epoch ms
SCHEDULE_LAST_SESSION: Final = "last_session"  # the session it started
SCHEDULE_FIRED: Final = "fired"  # how many sessions the schedule started
SCHEDULE_SKIPPED: Final = "skipped"  # occurrences skipped by the catch-up policy
SCHEDULE_UPDATED_AT: Final = "updated_at_ms"

# -- event types the runtime writes itself -----------------------------------------------------
SESSION_CREATED: Final = "session.created"
SESSION_STARTED: Final = "session.started"
SESSION_ENDED: Final = "session.ended"
SESSION_DELETED: Final = "session.deleted"
SESSION_CHECKPOINT: Final = "session.checkpoint"
CONTROL_CANCEL: Final = "control.cancel"
EVENT_TYPES: Final = (SESSION_CREATED, SESSION_STARTED, SESSION_ENDED, SESSION_DELETED,
                      SESSION_CHECKPOINT, CONTROL_CANCEL)


def constants() -> dict[str, str]:
    """Every layout constant by name (what the Lua prelude gets)."""
    return {k: v for k, v in globals().items() if k.isupper() and isinstance(v, str)}
