"""serve/worker/demo/dev with an unreachable Redis: a progress line while it is retried, then
one line and exit 1 (no traceback); a Redis that comes up while they wait is used."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest
from cli_process import CLI, run_cli, wait_readyz

from eventcore.testing._server import RedisServer, free_port


@pytest.mark.parametrize("args", [["serve", "--port", "0"],
                                  ["worker", "eventcore.server.demo:app"],
                                  ["demo", "--port", "0"],
                                  ["dev", "eventcore.server.demo:app", "--port", "0"]])
def test_unreachable_redis_is_progress_then_one_line(tmp_path: Path, args: list[str]) -> None:
    env = {"EVENTCORE_REDIS_URL": f"redis://user:hunter2@127.0.0.1:{free_port()}/0",
           "EVENTCORE_RETRY_BUDGET_S": "2", "EVENTCORE_API_KEY": "k" * 20,
           "EVENTCORE_DATA_DIR": str(tmp_path)}
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}, **env}
    done = subprocess.run([*CLI, *args], env=full, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"eventcore {args[0]}: waiting for Redis at "), done.stderr
    assert lines[-1].startswith(f"eventcore {args[0]}: error: Redis at "), done.stderr
    assert "unreachable" in lines[-1] and "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr  # the password is never shown


async def test_serve_waits_for_redis_to_come_up(tmp_path: Path) -> None:
    redis_port, api_port = free_port(), free_port()
    env = {"EVENTCORE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "EVENTCORE_RETRY_BUDGET_S": "60", "EVENTCORE_API_KEY": "k" * 20,
           "EVENTCORE_DATA_DIR": str(tmp_path), "EVENTCORE_NAMESPACE": "tpre"}
    async with run_cli("serve", "--port", str(api_port), "--no-subscribers", env=env) as cli:
        with anyio.fail_after(30):
            await cli.wait_stderr("eventcore serve: waiting for Redis at")
        with RedisServer(port=redis_port):
            with anyio.fail_after(30):
                await cli.wait_stderr("is up")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as http:
                await wait_readyz(http)
            cli.proc.terminate()
            await cli.proc.wait()
