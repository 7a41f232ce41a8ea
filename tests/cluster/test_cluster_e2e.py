"""End to end on a 3-master cluster: 2 ``eventcore serve`` processes and 2 ``eventcore
worker`` processes; sessions over every master created on one API process, inputs posted over
HTTP to the other, answers read back as JSON pages from the first: every input answered once,
every stream gap-free. (The live path is read as JSON pages, not SSE.)"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
from group_support import WORKERS, master_port, watching
from workers_support import EVENTCORE, WorkerProc

from eventcore import EventLog, load_settings
from eventcore.testing._server import LocalCluster, free_port
from eventcore.testing.invariants import check_log, read_all

API_KEY = "cluster-e2e-key-" + "k" * 24
SESSIONS = 120


def _start_api(env: dict[str, str], err: Path, files: list[IO[bytes]], *, subscribers: bool
               ) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    f = err.open("wb")
    files.append(f)
    proc = subprocess.Popen(
        [EVENTCORE, "serve", "worker_apps:app", "--port", str(port), "--log-level", "warning",
         *([] if subscribers else ["--no-subscribers"])],
        cwd=WORKERS, env=env, stdout=subprocess.DEVNULL, stderr=f)
    return f"http://127.0.0.1:{port}", proc


async def _ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(timeout=2) as c:
        with anyio.fail_after(60):
            while True:
                assert proc.poll() is None, "the API process exited"
                try:
                    if (await c.get(url + "/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await anyio.sleep(0.1)


async def test_two_apis_two_workers_every_input_answered_once(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    ns = f"e{uuid.uuid4().hex[:8]}"
    settings = load_settings(redis_url=redis_cluster.url, namespace=ns, shards=16,
                             retry_budget_s=10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    env.update({"EVENTCORE_REDIS_URL": redis_cluster.url, "EVENTCORE_NAMESPACE": ns,
                "EVENTCORE_SHARDS": "16", "EVENTCORE_API_KEY": API_KEY,
                "EVENTCORE_DATA_DIR": str(tmp_path / "data")})
    apis: list[tuple[str, subprocess.Popen[bytes]]] = []
    workers: list[WorkerProc] = []
    errs: list[IO[bytes]] = []
    async with EventLog(settings) as log, watching(log) as feed:
        try:
            for i in range(2):
                # the first one runs the built-in subscribers, the second only serves
                apis.append(_start_api(env, tmp_path / f"api{i}.err", errs,
                                       subscribers=i == 0))
            for url, proc in apis:
                await _ready(url, proc)
            for _ in range(2):
                workers.append(WorkerProc(log, "--lease-ttl", "5").start())
            for w in workers:
                await w.ready()
            (a, _), (b, _) = apis
            admin = {"Authorization": f"Bearer {API_KEY}"}
            tokens: dict[str, str] = {}
            async with httpx.AsyncClient(timeout=30) as http:
                async def create(i: int) -> None:
                    r = await http.post(f"{a}/v1/sessions", headers=admin,
                                        json={"agent": "echo", "input": f"first-{i}"})
                    assert r.status_code == 201, r.text
                    got = r.json()
                    tokens[got["session_id"]] = got["token"]

                async with anyio.create_task_group() as tg:
                    for i in range(SESSIONS):
                        tg.start_soon(create, i)
                sessions = sorted(tokens)
                masters = {master_port(redis_cluster, log.keys.session(s).stream)
                           for s in sessions}
                assert masters == {n.port for n in redis_cluster.masters()}

                async def post(sid: str) -> None:
                    r = await http.post(f"{b}/v1/sessions/{sid}/inputs",
                                        headers={"Authorization": f"Bearer {tokens[sid]}"},
                                        json={"payload": "second", "idempotency_key": "two"})
                    assert r.status_code == 200 and not r.json()["duplicate"], r.text

                async with anyio.create_task_group() as tg:
                    for sid in sessions:
                        tg.start_soon(post, sid)
                await feed.until(lambda: all(feed.count(s, "run.completed") == 2
                                             for s in sessions), within=120)

                pages: dict[str, list[dict[str, Any]]] = {}

                async def page(sid: str) -> None:
                    r = await http.get(f"{a}/v1/sessions/{sid}/events",
                                       params={"format": "json", "limit": 1000},
                                       headers={"Authorization": f"Bearer {tokens[sid]}"})
                    assert r.status_code == 200, r.text
                    pages[sid] = r.json()["events"]

                async with anyio.create_task_group() as tg:
                    for sid in sessions:
                        tg.start_soon(page, sid)
            answered_by: set[int] = set()
            for sid in sessions:
                events = await read_all(log, sid)
                check_log(events)  # gap-free, each event key once
                inputs = [e.payload for e in events if e.type == "input"]
                answers = [e.payload["text"] for e in events if e.type == "message"]
                assert len(inputs) == 2 and inputs[1] == "second"
                assert answers == [str(p).upper() for p in inputs]  # each input answered once
                assert [e["seq"] for e in pages[sid]] == list(range(1, len(events) + 1))
                answered_by |= {e.payload["pid"] for e in events if e.type == "progress"}
            assert answered_by == {w.pid for w in workers}  # both workers hosted sessions
        finally:
            for w in workers:
                if w.proc is not None and w.proc.poll() is None:
                    await w.stop()
                w.kill()
            for _, proc in apis:
                proc.terminate()
            for _, proc in apis:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for f in errs:
                f.close()
