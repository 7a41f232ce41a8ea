"""``eventcore dev APP`` and ``eventcore demo`` as real child processes: the user's own app on
the embedded Redis, reloaded when its code changes; SIGTERM and SIGINT stop everything the
command started (no redis-server or app process left behind)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from cli_process import CLI, Cli

DEADLINE = 90

USER_APP = '''
from eventcore.workers import App, Session

app = App()


@app.agent("greeter")
async def greeter(session: Session) -> None:
    async for msg in session.inputs():
        await session.emit("message", {"version": VERSION, "got": msg.payload})

VERSION = 1
'''


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    env.update({"EVENTCORE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "300"})
    return env


async def _spawn(args: list[str], cwd: Path, env: dict[str, str]) -> Cli:
    proc = await anyio.open_process([*CLI, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    return Cli(proc)


async def _until(cli: Cli, pattern: str) -> re.Match[str]:
    """The first stdout line matching ``pattern`` (lines are the command's events)."""
    while True:
        line = await cli.line()
        m = re.search(pattern, line)
        if m:
            return m


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return out


async def _message(http: httpx.AsyncClient, sid: str, after: int = 0) -> dict[str, Any]:
    """The session's first ``message`` envelope (JSON pages, long-polled by the server)."""
    with anyio.fail_after(60):
        while True:
            r = await http.get(f"/v1/sessions/{sid}/events",
                               params={"format": "json", "after": after})
            assert r.status_code == 200, r.text
            body = r.json()
            for env in body["events"]:
                if env["type"] == "message":
                    return dict(env["payload"])
            after = body["next_after"]
            await anyio.sleep(0.1)  # JSON pages answer at once: poll, with the deadline above


async def _greet(base: str, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        made = await http.post("/v1/sessions", json={"agent": "greeter", "input": "hi"})
        assert made.status_code == 201, made.text
        return await _message(http, made.json()["session_id"])


async def test_dev_runs_the_users_app_reloads_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "greetings.py").write_text(USER_APP)
    cli = await _spawn(["dev", "greetings:app", "--port", "0"], tmp_path, _env(tmp_path))
    try:
        with anyio.fail_after(DEADLINE):
            base = (await _until(cli, r"API\s+(http://127\.0\.0\.1:\d+)")).group(1)
            assert (await _until(cli, r"UI\s+(\S+)")).group(1) == f"{base}/ui"
            assert (await _until(cli, r"docs\s+(\S+)")).group(1) == f"{base}/docs"
            key = (await _until(cli, r"API key\s+(\S+)")).group(1)
            await _until(cli, r"eventcore dev: ready")
            assert (await _greet(base, key)) == {"version": 1, "got": "hi"}
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/docs")).status_code == 200

            (tmp_path / "greetings.py").write_text(USER_APP.replace("VERSION = 1",
                                                                    "VERSION = 2"))
            await _until(cli, r"greetings\.py changed: reloading")
            await _until(cli, r"reloaded, ready")
            assert (await _greet(base, key)) == {"version": 2, "got": "hi"}

            started = _descendants(cli.proc.pid)
            names = " ".join(" ".join(p.cmdline()) for p in started)
            assert "redis-server" in names and "child_main" in names
            cli.proc.send_signal(signal.SIGTERM)
            assert await cli.proc.wait() == 0
            out, _ = await cli.rest()
        assert "eventcore dev: stopped" in out
        assert _alive(started) == []
        assert not (tmp_path / "data" / "redis.sock").exists()
    finally:
        if cli.proc.returncode is None:
            cli.proc.kill()
        await cli.proc.aclose()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_dev_signal_stops_redis_and_the_app_process(tmp_path: Path,
                                                          sig: signal.Signals) -> None:
    (tmp_path / "greetings.py").write_text(USER_APP)
    cli = await _spawn(["dev", "greetings:app", "--port", "0", "--no-reload"], tmp_path,
                       _env(tmp_path))
    try:
        with anyio.fail_after(DEADLINE):
            await _until(cli, r"eventcore dev: ready")
            started = _descendants(cli.proc.pid)
            assert len(started) >= 2
            cli.proc.send_signal(sig)
            assert await cli.proc.wait() == 0
        assert _alive(started) == []
    finally:
        if cli.proc.returncode is None:
            cli.proc.kill()
        await cli.proc.aclose()


def test_dev_bad_app_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "dev", "nosuchmodule:app", "--port", "0"], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eventcore dev: error:"), done.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


async def test_demo_sigterm_leaves_no_redis_server(tmp_path: Path) -> None:
    cli = await _spawn(["demo", "--port", "0"], tmp_path, _env(tmp_path))
    try:
        with anyio.fail_after(DEADLINE):
            await _until(cli, r"live stream \(SSE\)")
            started = _descendants(cli.proc.pid)
            assert any("redis-server" in " ".join(p.cmdline()) for p in started)
            cli.proc.send_signal(signal.SIGTERM)
            assert await cli.proc.wait() == 0
            out, _ = await cli.rest()
        assert "demo stopped (SIGTERM)" in out
        assert _alive(started) == []
    finally:
        if cli.proc.returncode is None:
            cli.proc.kill()
        await cli.proc.aclose()
