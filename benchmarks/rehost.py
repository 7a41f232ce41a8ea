"""Waking a long session: the cost of re-hosting with and without checkpoints.

Run: ``.venv/bin/python benchmarks/rehost.py [--inputs 200,2000] [--runs 3]``. Spawns its own
redis-server and an in-process worker (idle timeout 0.5 s). For each history length N, two
sessions of the same agent logic each answer N inputs (one run and one message per input), then
idle out and are unloaded. The measurement is the wake-up: the time from appending input N+1
until its answer is in the log, which includes the claim and everything the new hosting does
before it gets to the new input:

``replay``      (the baseline) no checkpoints: the handler is given all N earlier inputs again;
                every write of theirs is deduplicated and nothing runs twice, but each costs a
                round trip
``checkpoint``  ``session.checkpoint(state)`` after each input: the new hosting reads the last
                checkpoint and is given only input N+1

Prints JSON: medians over ``--runs`` wake-ups per N and mode, and the ratio replay/checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import anyio

from eventcore import Envelope, EventLog, load_settings
from eventcore.testing._server import RedisServer
from eventcore.workers import App, Session, Worker

app = App()


async def _answer(session: Session, *, checkpoint: bool) -> None:
    state = session.restored or {"n": 0}
    async for msg in session.inputs():
        async with session.run("reply") as run:
            state = {"n": state["n"] + 1}
            await run.emit("message", {"n": state["n"], "echo": msg.payload})
        if checkpoint:
            await session.checkpoint(state)


@app.agent("replay")
async def replay(session: Session) -> None:
    await _answer(session, checkpoint=False)


@app.agent("checkpoint")
async def checkpointed(session: Session) -> None:
    await _answer(session, checkpoint=True)


async def first(log: EventLog, sid: str, after: int, typ: str) -> int:
    """Follow the session from ``after`` until an envelope of ``typ``: its seq."""
    async for env in log.tail(sid, after=after, until_ended=False):
        if env.type == typ:
            return env.seq
    raise RuntimeError("the session ended")


async def one(log: EventLog, agent: str, n: int) -> float:
    sid = (await log.create_session(agent)).session_id
    await log.append_many([Envelope(type="input", session_id=sid, payload=i)
                           for i in range(n)])
    answered = 0
    async for env in log.tail(sid, until_ended=False):  # all N answered
        answered += env.type == "message"
        if answered == n:
            break
    # unloaded after the idle timeout (a state, nothing to await)
    while (await log.get_session(sid)).state != "idle":  # noqa: ASYNC110
        await anyio.sleep(0.05)
    seq = (await log.get_session(sid)).last_seq
    t0 = time.perf_counter()
    await log.append(Envelope(type="input", session_id=sid, payload="wake"))
    await first(log, sid, seq, "message")
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", default="200,2000")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(x) for x in args.inputs.split(",")]
    raw: dict[int, dict[str, list[float]]] = {n: {"replay": [], "checkpoint": []}
                                              for n in sizes}
    with RedisServer(appendonly=False) as server:
        settings = load_settings(redis_url=server.url, namespace="rehost", shards=16)
        async with EventLog(settings) as log, anyio.create_task_group() as tg:
            worker = Worker(app, log, concurrency=100, idle_timeout_s=0.5, block_ms=100)
            await tg.start(worker.run)
            for run in range(args.runs):
                for n in sizes:
                    for agent in ("replay", "checkpoint"):
                        took = await one(log, agent, n)
                        raw[n][agent].append(took)
                        print(json.dumps({"run": run, "inputs": n, "mode": agent,
                                          "wake_s": round(took, 4)}), file=sys.stderr)
            await worker.aclose()
            tg.cancel_scope.cancel()
    out: dict[str, Any] = {"benchmark": "rehost", "runs": args.runs}
    for n in sizes:
        rp, ck = (statistics.median(raw[n][m]) for m in ("replay", "checkpoint"))
        out[f"inputs_{n}"] = {"replay_wake_ms": round(1000 * rp, 1),
                              "checkpoint_wake_ms": round(1000 * ck, 1),
                              "ratio_replay_vs_checkpoint": round(rp / ck, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    anyio.run(main)
