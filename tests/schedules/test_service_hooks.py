"""``eventcore serve`` and ``eventcore worker`` run the scheduler (real child processes on the
real clock: the schedules are made due already, so nothing waits for a minute to pass)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from eventcore import EventLog, load_settings
from eventcore.schedules import Schedules
from eventcore.testing._server import free_port

CLI = [sys.executable, "-c", "from eventcore.server._cli import main; main()"]


@pytest.mark.parametrize("command", ["serve", "worker"])
async def test_the_process_fires_due_schedules(redis_url: str, tmp_path: Path,
                                               command: str) -> None:
    ns = f"t{os.urandom(5).hex()}"
    env = {**os.environ, "EVENTCORE_REDIS_URL": redis_url, "EVENTCORE_NAMESPACE": ns,
           "EVENTCORE_DATA_DIR": str(tmp_path), "EVENTCORE_API_KEY": "k" * 24,
           "EVENTCORE_SCHEDULE_INTERVAL_S": "0.1",
           # no grace: an occurrence of the last minute would otherwise be fired on time
           # besides the one catch-up (the test failed so when run just after hh:m0)
           "EVENTCORE_SCHEDULE_GRACE_S": "0"}
    args = {"serve": ["serve", "eventcore.server.demo:app", "--port", str(free_port()),
                      "--no-subscribers", "--log-level", "warning"],
            "worker": ["worker", "eventcore.server.demo:app"]}[command]
    settings = load_settings(redis_url=redis_url, namespace=ns)
    async with EventLog(settings) as log:
        hour_ago = time.time() - 3600
        await Schedules(log, now=lambda: hour_ago).create(
            "due", cron="*/10 * * * *", agent="echo", input={"text": "hi"})
        err = (tmp_path / "err").open("wb")
        proc = await anyio.open_process([*CLI, *args], env=env, stdout=subprocess.DEVNULL,
                                        stderr=err)
        try:
            with anyio.fail_after(60):
                while (got := await Schedules(log).get("due")).fired == 0:
                    assert proc.returncode is None, (tmp_path / "err").read_text()
                    await anyio.sleep(0.1)
            assert got.fired == 1 and got.skipped >= 5  # catch-up once: the latest of 6 (or 7)
            assert got.next_run_at is not None and got.next_run_at.timestamp() > time.time()
            assert got.last_session_id is not None
            info = await log.get_session(got.last_session_id)
            assert info.agent == "echo" and info.labels["schedule"] == "due"
        finally:
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await proc.wait()
            err.close()
