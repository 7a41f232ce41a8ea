"""``eventcore schedules list|create|show|enable|disable|delete`` as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from eventcore.testing._plugin import unique_namespace

CLI = [sys.executable, "-c", "from eventcore.server._cli import main; main()", "schedules"]


def test_schedules_cli(redis_url: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")},
           "EVENTCORE_REDIS_URL": redis_url, "EVENTCORE_NAMESPACE": unique_namespace(),
           "EVENTCORE_SHARDS": "4"}

    def run(*args: str, code: int = 0) -> str:
        p = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == code, p.stderr
        return p.stdout if code == 0 else p.stderr

    made = json.loads(run("create", "report", "0 9 * * 1-5", "--agent", "echo",
                          "--timezone", "America/New_York", "--input", '{"q": 1}',
                          "--label", "team=ops"))
    assert made["id"] == "report" and made["input"] == {"q": 1}
    assert made["labels"] == {"team": "ops"} and made["enabled"]
    listed = run("list")
    assert listed.startswith("report\t0 9 * * 1-5\tAmerica/New_York\tenabled\t")
    assert json.loads(run("show", "report")) == made
    assert json.loads(run("disable", "report"))["enabled"] is False
    assert "\tdisabled\t-\t" in run("list")
    assert json.loads(run("enable", "report"))["next_run_at"] is not None
    assert [json.loads(line)["id"] for line in run("list", "--json").splitlines()] == ["report"]
    assert "invalid cron expression" in run("create", "x", "0 0 30 2 *", "--agent", "echo",
                                            code=1)
    assert "unknown timezone" in run("create", "x", "* * * * *", "--agent", "echo",
                                     "--timezone", "Moon/Base", code=1)
    assert run("delete", "report").strip() == "deleted report"
    assert "does not exist" in run("show", "report", code=1)
    assert run("list") == ""
