"""`eventcore demo` and `eventcore serve` as real child processes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import anyio
import httpx
import msgspec
from cli_process import CLI, wait_readyz
from httpx_sse import aconnect_sse

from eventcore.testing._server import free_port


def test_demo_runs_the_whole_system_and_stops_by_itself(tmp_path: Path) -> None:
    env = {**os.environ, "EVENTCORE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "300"}
    env.pop("EVENTCORE_REDIS_URL", None)
    done = subprocess.run([*CLI, "demo", "--exit-after", "8", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "embedded redis-server" in out
    assert re.search(r"live viewer\s+http://127\.0\.0\.1:\d+/ui#session=s_[0-9a-f]+&token=", out)
    seqs = [int(m) for m in re.findall(r"^\s*(\d+) \S", out, re.M)]
    assert seqs[:3] == [1, 2, 3] and seqs == list(range(1, len(seqs) + 1)), seqs
    assert re.search(r'message\s+{"text":"hello"}', out)  # echo answered via the worker
    assert "demo stopped after 8 s" in out
    assert (tmp_path / "data" / "appendonlydir").is_dir()  # embedded Redis kept an AOF
    assert (tmp_path / "data" / "history.sqlite3").exists()  # persistence ran
    assert not (tmp_path / "data" / "redis.sock").exists()  # and the server was stopped


async def test_serve_runs_api_projector_and_persistence(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    ns = f"t{os.urandom(5).hex()}"
    env = {**os.environ, "EVENTCORE_REDIS_URL": redis_url, "EVENTCORE_NAMESPACE": ns,
           "EVENTCORE_DATA_DIR": str(tmp_path), "EVENTCORE_API_KEY": "k" * 24}
    serve_err = (tmp_path / "serve.err").open("wb")
    worker_err = (tmp_path / "worker.err").open("wb")
    proc = await anyio.open_process(
        [*CLI, "serve", "eventcore.server.demo:app", "--port", str(port), "--log-level",
         "warning"], env=env, stdout=subprocess.DEVNULL, stderr=serve_err)
    worker = await anyio.open_process(
        [*CLI, "worker", "eventcore.server.demo:app"], env=env, stdout=subprocess.DEVNULL,
        stderr=worker_err)
    base = f"http://127.0.0.1:{port}"
    admin = {"Authorization": "Bearer " + "k" * 24}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            await wait_readyz(http)
            refused = await http.post("/v1/sessions", json={"agent": "nope"}, headers=admin)
            assert refused.status_code == 422  # APP restricts agents
            made = (await http.post("/v1/sessions", json={"agent": "echo"}, headers=admin)).json()
            sid, auth = made["session_id"], {"Authorization": f"Bearer {made['token']}"}
            for i, text in enumerate(["hello", "bye"]):
                r = await http.post(f"/v1/sessions/{sid}/inputs", headers=auth,
                                    json={"payload": {"text": text}, "idempotency_key": str(i)})
                assert r.status_code in (200, 201), r.text
            types: list[str] = []
            envs: list[dict[str, object]] = []
            with anyio.fail_after(30):
                async with aconnect_sse(http, "GET", f"/v1/sessions/{sid}/events",
                                        headers=auth) as source:
                    async for sse in source.aiter_sse():
                        if sse.data:
                            envs.append(msgspec.json.decode(sse.data))
                            types.append(str(envs[-1]["type"]))
                            if types[-1] == "session.ended":
                                break
            assert types[-1] == "session.ended"
            # the contract of eventcore.server.demo:app's echo agent, per input
            assert [e["payload"] for e in envs if e["type"] == "message"] == [
                {"text": "hello"}, {"text": "bye"}]
            assert [e["payload"]["key"] for e in envs if e["type"] == "signal"] == ["status"] * 2
            for kind in ("run.started", "tool.started", "tool.ended", "effect", "run.completed"):
                assert types.count(kind) == 2, (kind, types)
            with anyio.fail_after(30):
                while True:  # the projector applies the feed asynchronously
                    got = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
                    view = got.get("projection") or {}
                    if view.get("status") == "ended" and view.get("last_seq") == len(types):
                        break
                    await anyio.sleep(0.1)
            assert got["state"] == "ended"
            assert view["counts"]["message"] == 2
    finally:
        codes = {}
        for p in (proc, worker):
            p.terminate()
        for p, name in ((proc, "serve"), (worker, "worker")):
            with anyio.move_on_after(30):
                await p.wait()
            codes[name] = p.returncode  # None: SIGTERM was ignored
            if p.returncode is None:
                p.kill()
                await p.wait()
            await p.aclose()
        serve_err.close()
        worker_err.close()
    for name, code in codes.items():
        log = (tmp_path / f"{name}.err").read_text()[-3000:]
        assert code == 0, f"{name} did not exit cleanly on SIGTERM ({code}):\n{log}"
