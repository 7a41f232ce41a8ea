"""eventcore: an event-sourced streaming runtime for long-lived sessions on Redis Streams."""

from ._append import AppendResult
from ._codec import client_json
from ._envelope import (
    SCHEMA_VERSION,
    EffectPayload,
    Envelope,
    ErrorInfo,
    RunPayload,
    SessionCheckpointPayload,
    SessionCreatedPayload,
    SessionEndedPayload,
    SignalPayload,
    SignalSummary,
    ToolPayload,
    decode_payload,
)
from ._keys import Keys, SessionKeys, validate_key, validate_session_id
from ._log import EventLog, HistoryArchive
from ._sessions import SessionInfo, SessionState
from ._settings import Settings, load_settings
from .errors import (
    ConfigError,
    CorruptEntry,
    EffectFailed,
    EmbeddedRedisError,
    EventcoreError,
    HistoryGone,
    PayloadTooLarge,
    RedisError,
    RedisUnavailable,
    SessionEnded,
    SessionError,
    SessionNotFound,
    SinkFailed,
    StaleHost,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "AppendResult",
    "ConfigError",
    "CorruptEntry",
    "EffectFailed",
    "EffectPayload",
    "EmbeddedRedisError",
    "Envelope",
    "ErrorInfo",
    "EventLog",
    "EventcoreError",
    "HistoryArchive",
    "HistoryGone",
    "Keys",
    "PayloadTooLarge",
    "RedisError",
    "RedisUnavailable",
    "RunPayload",
    "SessionCheckpointPayload",
    "SessionCreatedPayload",
    "SessionEnded",
    "SessionEndedPayload",
    "SessionError",
    "SessionInfo",
    "SessionKeys",
    "SessionNotFound",
    "SessionState",
    "Settings",
    "SignalPayload",
    "SignalSummary",
    "SinkFailed",
    "StaleHost",
    "ToolPayload",
    "ValidationError",
    "client_json",
    "decode_payload",
    "load_settings",
    "validate_key",
    "validate_session_id",
]
