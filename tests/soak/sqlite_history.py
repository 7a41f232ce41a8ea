"""A history process beside the API's: every envelope into a SQLite file, through the same
``Persistence`` subscriber in a consumer group of its own, so the soak stores the whole log in
PostgreSQL (the API's built-in persistence) and SQLite at once.

    python sqlite_history.py sqlite+aiosqlite:////path/history.sqlite3

Settings come from ``EVENTCORE_*``. Prints a JSON ``ready`` line once consuming; SIGTERM stops
it after the batch in hand.
"""

from __future__ import annotations

import json
import signal
import sys

import anyio

from eventcore import EventLog, load_settings
from eventcore.subscribers import Persistence, SubscriberRunner

GROUP = "persistence-sqlite"


async def main(url: str) -> None:
    async with (
        EventLog(load_settings()) as log,
        Persistence(log, url) as store,
        SubscriberRunner(log, store, group=GROUP, checkpoints=store),
    ):
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            print(json.dumps({"event": "ready", "group": GROUP}), flush=True)
            async for _ in signals:
                break


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
