"""``eventcore sessions list|show|send|cancel|dead-letters``: the real CLI against the real
service (child processes of the test), tables and --json, errors as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import anyio
import pytest
from cli_process import CLI
from live_service import Service, serve

from eventcore import EventLog, TerminalError
from eventcore.testing.invariants import read_all
from eventcore.workers import App, Session, Worker

DEADLINE = 60


async def _cli(svc: Service | None, *args: str, key: str | None = None,
               url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    if svc is not None:
        env["EVENTCORE_URL"] = svc.url
        env["EVENTCORE_API_KEY"] = svc.api_key if key is None else key
    env["COLUMNS"] = "250"
    cmd = [*CLI, "sessions", *args] + (["--url", url] if url else [])
    with anyio.fail_after(DEADLINE):
        return await anyio.run_process(cmd, env=env, check=False)


def _text(done: Any) -> tuple[str, str]:
    return done.stdout.decode(), done.stderr.decode()


async def test_list_show_send_cancel(event_log: EventLog) -> None:
    async with serve(event_log) as svc:
        a = await event_log.create_session("alpha", labels={"team": "red"})
        b = await event_log.create_session(None, labels={"team": "blue"})  # nobody hosts it
        done = await _cli(svc, "list")
        out, _ = _text(done)
        assert done.returncode == 0
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["SESSION", "AGENT", "STATE", "SEQ"]
        assert [ln.split()[0] for ln in lines[1:]] == [b.session_id, a.session_id]
        assert "team=red" in out

        done = await _cli(svc, "list", "--json", "--agent", "alpha")
        rows = [json.loads(ln) for ln in _text(done)[0].splitlines()]
        assert [(r["session_id"], r["agent"], r["state"]) for r in rows] == [
            (a.session_id, "alpha", "created")]

        # pages: --limit 1 shows one and names the cursor; --all follows it
        done = await _cli(svc, "list", "--json", "--limit", "1")
        out, err = _text(done)
        assert len(out.splitlines()) == 1 and "more: --cursor " in err
        cursor = err.split("more: --cursor ")[1].split()[0]
        done = await _cli(svc, "list", "--json", "--limit", "1", "--cursor", cursor)
        assert json.loads(_text(done)[0])["session_id"] == a.session_id
        done = await _cli(svc, "list", "--json", "--limit", "1", "--all")
        assert len(_text(done)[0].splitlines()) == 2

        done = await _cli(svc, "show", a.session_id)
        out, _ = _text(done)
        assert done.returncode == 0 and a.session_id in out and "alpha" in out
        done = await _cli(svc, "show", a.session_id, "--json")
        assert json.loads(_text(done)[0])["labels"] == {"team": "red"}

        done = await _cli(svc, "send", a.session_id, '{"text": "hi"}', "--idempotency-key",
                          "k1", "--json")
        assert json.loads(_text(done)[0]) == {"seq": 2, "duplicate": False}
        done = await _cli(svc, "send", a.session_id, '{"text": "hi"}', "--idempotency-key",
                          "k1")
        assert "already sent: seq 2" in _text(done)[0]
        done = await _cli(svc, "send", a.session_id, "plain words", "--text")
        assert done.returncode == 0
        envs = await read_all(event_log, a.session_id)
        assert [e.payload for e in envs if e.type == "input"] == [{"text": "hi"},
                                                                  {"text": "plain words"}]

        done = await _cli(svc, "cancel", b.session_id, "--reason", "enough")
        assert done.returncode == 0 and "cancel requested" in _text(done)[0]
        assert (await event_log.get_session(b.session_id)).state == "ended"
        done = await _cli(svc, "list", "--state", "ended", "--json")
        assert [json.loads(ln)["session_id"] for ln in _text(done)[0].splitlines()] == [
            b.session_id]


async def test_dead_letters(event_log: EventLog) -> None:
    app = App()

    @app.agent("doomed")
    async def doomed(session: Session) -> None:
        raise TerminalError("cannot ever work")

    s = await event_log.create_session("doomed")
    await Worker(app, event_log, lease_ttl_s=2, idle_timeout_s=5).run_burst()
    async with serve(event_log) as svc:
        done = await _cli(svc, "dead-letters", "--json")
        rows = [json.loads(ln) for ln in _text(done)[0].splitlines()]
        assert [(r["session_id"], r["agent"]) for r in rows] == [(s.session_id, "doomed")]
        assert rows[0]["error"]["message"] == "cannot ever work"
        done = await _cli(svc, "dead-letters")
        assert "TerminalError: cannot ever work" in _text(done)[0]
        done = await _cli(svc, "dead-letters", "--session", "someone-else", "--json")
        assert _text(done)[0] == ""


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["show", "no-such"], 1, "404"),
    (["show", "bad id!"], 2, "SESSION"),
    (["send", "x", "{not json"], 2, "not JSON"),
    (["list", "--state", "nope"], 1, "422"),
])
async def test_errors_are_one_line(event_log: EventLog, args: list[str], code: int,
                                   needle: str) -> None:
    async with serve(event_log) as svc:
        done = await _cli(svc, *args)
    _, err = _text(done)
    assert done.returncode == code, err
    assert needle in err and "Traceback" not in err


async def test_wrong_key_and_no_server(event_log: EventLog) -> None:
    async with serve(event_log) as svc:
        done = await _cli(svc, "list", key="w" * 20)
        assert done.returncode == 1
        assert _text(done)[1].strip().startswith("eventcore sessions list: error: 401")
    done = await _cli(None, "list", "--api-key", "x" * 20, url="http://127.0.0.1:9")
    assert done.returncode == 1 and "cannot reach" in _text(done)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    no_key = await anyio.run_process([*CLI, "sessions", "list"], env=env, check=False)
    assert no_key.returncode == 2 and b"no API key" in no_key.stderr
    assert sys.executable  # the CLI ran under this interpreter
