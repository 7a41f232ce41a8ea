"""`eventcore serve` start-up as a real child process: the made-up API key is shown and works,
bad configuration is one line and exit code 2; `eventcore --version`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest
from cli_process import CLI, run_cli, wait_readyz

import eventcore
from eventcore.testing._server import free_port


async def test_serve_without_a_key_prints_the_one_it_made_up(redis_url: str,
                                                             tmp_path: Path) -> None:
    port = free_port()
    env = {"EVENTCORE_REDIS_URL": redis_url, "EVENTCORE_NAMESPACE": "tkey",
           "EVENTCORE_DATA_DIR": str(tmp_path)}
    async with run_cli("serve", "--port", str(port), "--no-subscribers", "--log-format",
                       "text", env=env) as cli:
        with anyio.fail_after(30):
            line = await cli.wait_stderr("API key of this process")
        found = re.search(r"EVENTCORE_API_KEY is not set; API key of this process: (\S+)$",
                          line.strip())
        assert found, line
        key = found.group(1)
        assert len(key) >= 16
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            await wait_readyz(http)
            made = await http.post("/v1/sessions", json={"agent": "echo"},
                                   headers={"Authorization": f"Bearer {key}"})
            assert made.status_code == 201, made.text
        cli.proc.terminate()
        _, err = await cli.rest()
        assert err.count(key) == 0  # shown once (the line read above), never logged again


@pytest.mark.parametrize(("env", "fragment"), [
    ({"EVENTCORE_API_KEY": "short"}, "EVENTCORE_API_KEY must be at least 16 characters"),
    ({"EVENTCORE_SHARDS": "0"}, "EVENTCORE_SHARDS"),
    ({"EVENTCORE_CORS_ORIGINS": "example.com"}, "EVENTCORE_CORS_ORIGINS"),
])
async def test_serve_bad_config_is_one_line_and_exit_2(
        redis_url: str, env: dict[str, str], fragment: str) -> None:
    async with run_cli("serve", "--port", str(free_port()),
                       env={"EVENTCORE_REDIS_URL": redis_url, **env}) as cli:
        with anyio.fail_after(30):
            _, err = await cli.rest()
            code = await cli.proc.wait()
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eventcore serve: error: "), err
    assert fragment in lines[0]


def test_version() -> None:
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"eventcore {eventcore.__version__}"
