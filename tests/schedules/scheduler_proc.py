"""A scheduler process for the tests: ``python scheduler_proc.py REDIS_URL NAMESPACE CLOCK``.
Its clock is the number in the file CLOCK (epoch seconds), which the test advances."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from eventcore import EventLog, load_settings
from eventcore.schedules import Scheduler


def main() -> None:
    url, namespace, clock = sys.argv[1:4]

    def now() -> float:
        return float(Path(clock).read_text())

    async def run() -> None:
        settings = load_settings(redis_url=url, namespace=namespace, shards=4,
                                 retry_budget_s=30)
        async with EventLog(settings) as log, Scheduler(
                log, now=now, interval_s=0.02, grace_s=86400, catchup_max=1000):
            print("ready", flush=True)
            await anyio.sleep_forever()

    anyio.run(run)


if __name__ == "__main__":
    main()
