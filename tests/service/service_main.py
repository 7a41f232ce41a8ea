"""Real service processes for the HTTP tests (settings from EVENTCORE_* in the environment).

    python service_main.py api PORT     uvicorn serving create_app() + the projector
    python service_main.py worker       a worker pool hosting the ``echo`` agent below
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import anyio

from eventcore import EventLog, load_settings
from eventcore.server._http import ServiceContext, create_app, serve
from eventcore.subscribers import Projector, SubscriberRunner
from eventcore.workers import App, Session, Worker

agents = App()


async def _shout(args: dict[str, Any]) -> str:
    return str(args["text"]).upper()


@agents.agent("echo")
async def echo(session: Session) -> None:
    """For each input ``{"text": T}``: a run, one memoized tool call, a ``status`` signal and a
    ``message`` with the same text."""
    async for msg in session.inputs():
        payload = msg.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
            continue
        async with session.run("reply") as run:
            await run.tool("shout", {"text": payload["text"]}, _shout)
            await session.signal("status", "replied")
            await run.emit("message", {"text": payload["text"]})


def projector(ctx: ServiceContext) -> SubscriberRunner:
    return SubscriberRunner(ctx.log, Projector(ctx.log), block_ms=200)


async def run_worker() -> None:
    async with EventLog(load_settings()) as log:
        worker = Worker(agents, log, lease_ttl_s=2.0, drain_timeout_s=2.0)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                print("worker ready", flush=True)
                async for _ in signals:
                    worker.drain(now=True)
                    break


def main() -> None:
    role = sys.argv[1]
    if role == "api":
        app = create_app(services=[projector], agents=list(agents.agents),
                         groups=[("feed", "projector")])
        serve(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="info",
              graceful_timeout_s=5)
    elif role == "worker":
        anyio.run(run_worker)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
