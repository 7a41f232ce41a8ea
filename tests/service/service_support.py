"""Shared by the service tests: the API key and the API/worker child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from eventcore.testing._server import free_port

MAIN = Path(__file__).with_name("service_main.py")
API_KEY = "test-api-key-" + "x" * 24


class Proc:
    """One service subprocess; ``restart()`` keeps its port (clients reconnect to the same URL)."""

    def __init__(self, role: str, env: dict[str, str], port: int | None, logdir: Path) -> None:
        self.role = role
        self.env = env
        self.port = port
        self.logfile = logdir / f"{role}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Proc:
        args = [sys.executable, str(MAIN), self.role]
        if self.port is not None:
            args.append(str(self.port))
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited at start:\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.05)  # a child process has no readiness signal but its own answers
        raise RuntimeError(f"{self.role} not ready in {timeout}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.port is None:
            return b"worker ready" in self.logfile.read_bytes()
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self) -> str:
        return self.logfile.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


class Service:
    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.api = Proc("api", env, free_port(), logdir)
        self.procs: list[Proc] = [self.api]

    @property
    def url(self) -> str:
        return self.api.url

    def worker(self) -> Proc:
        proc = Proc("worker", self.env, None, self.logdir)
        self.procs.append(proc)
        return proc.start()

    def client(self, credential: str | None = API_KEY, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)

    async def create(self, agent: str = "echo", **body: Any) -> tuple[str, str]:
        async with self.client() as c:
            r = await c.post("/v1/sessions", json={"agent": agent, **body})
            assert r.status_code == 201, r.text
            return r.json()["session_id"], r.json()["token"]


def service_env_for(redis_url: str, **overrides: str | None) -> dict[str, str]:
    """The environment of a service process on ``redis_url`` in a namespace of its own (no
    ``EVENTCORE_*`` of this run's own leaks in); an override of ``None`` drops that setting."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    env.update({
        "EVENTCORE_REDIS_URL": redis_url,
        "EVENTCORE_NAMESPACE": f"t{uuid.uuid4().hex[:12]}",
        "EVENTCORE_SHARDS": "4",
        "EVENTCORE_API_KEY": API_KEY,
        "EVENTCORE_HTTP_MAX_BODY": str(64 * 1024),
        "EVENTCORE_SSE_HEARTBEAT_S": "1",
        "EVENTCORE_SSE_SEND_TIMEOUT_S": "3",
        "EVENTCORE_RETRY_BUDGET_S": "5",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(MAIN.parent),
                                                    os.environ.get("PYTHONPATH")])),
    })
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env

