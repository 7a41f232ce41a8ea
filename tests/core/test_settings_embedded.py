"""Settings validation, and the embedded Redis (start, reuse, ownership, AOF)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from eventcore import ConfigError, EventLog, RedisUnavailable, load_settings
from eventcore._embedded import EmbeddedRedis
from eventcore.testing._server import RedisServer, free_port


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("EVENTCORE_SHARDS", "0", "EVENTCORE_SHARDS"),
        ("EVENTCORE_SHARDS", "many", "EVENTCORE_SHARDS"),
        ("EVENTCORE_REDIS_URL", "http://localhost", "EVENTCORE_REDIS_URL"),
        ("EVENTCORE_NAMESPACE", "a{b}", "EVENTCORE_NAMESPACE"),
        ("EVENTCORE_INLINE_LIMIT", "10", "EVENTCORE_INLINE_LIMIT"),
        ("EVENTCORE_RETRY_BUDGET_S", "-1", "EVENTCORE_RETRY_BUDGET_S"),
        ("EVENTCORE_MAX_BATCH", "0", "EVENTCORE_MAX_BATCH"),
        ("EVENTCORE_SESSION_TTL_S", "-5", "EVENTCORE_SESSION_TTL_S"),
    ],
)
def test_bad_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert fragment in str(info.value)


def test_overrides_and_unknown_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTCORE_SHARDS", "8")
    assert load_settings().shards == 8
    assert load_settings(shards=3).shards == 3  # arguments win over the environment
    with pytest.raises(ConfigError) as info:
        load_settings(shardz=3)
    assert "EVENTCORE_SHARDZ" in str(info.value)
    with pytest.raises(ConfigError):
        EventLog(namespace="bad namespace")


async def test_unreachable_redis_is_a_typed_error() -> None:
    log = EventLog(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_budget_s=0.3)
    with pytest.raises(RedisUnavailable):
        await log.start()
    await log.aclose()


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def test_embedded_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    monkeypatch.delenv("EVENTCORE_REDIS_URL", raising=False)
    data = tmp_path / "data"
    # the same redis-server binary the suite runs on (7.x, or the 6.2 wheel binary)
    opts = {"data_dir": data, "redis_server": redis_server.binary, "namespace": "emb"}
    owner = EventLog(**opts)
    await owner.start()
    try:
        assert owner._embedded is not None and owner._embedded.owned
        sock = owner._embedded.socket
        assert sock.parent == data.resolve() and _answers(sock)
        assert (await owner.redis.config_get("appendonly"))["appendonly"] == "yes"
        s = await owner.create_session("demo")
        await owner.emit(s.session_id, "message", "persist me")
        # a second log on the same data dir reuses the running server and does not own it
        async with EventLog(**opts) as guest:
            assert guest._embedded is not None and not guest._embedded.owned
            assert [e.payload for e in await guest.read(s.session_id)][1] == "persist me"
        assert _answers(sock)  # the guest left it running
    finally:
        await owner.aclose()
    assert not _answers(sock)  # the owner stopped it
    assert any(p.name.startswith("appendonly") for p in data.iterdir())
    # started again, the AOF brings the log back
    async with EventLog(**opts) as again:
        assert again._embedded is not None and again._embedded.owned
        assert [e.payload for e in await again.read(s.session_id)][1] == "persist me"
    assert not _answers(sock)


def test_embedded_long_data_dir_uses_a_short_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    emb = EmbeddedRedis(deep)
    assert len(str(emb.socket)) < 100
    assert emb.url.startswith("unix://")
