"""Child process for the SIGKILL test: a runner whose subscriber applies the first half of its
first batch, says so on stdout, and then hangs (until the parent kills it with SIGKILL)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).parent))

from subscriber_helpers import AppliedLog

from eventcore import EventLog, load_settings
from eventcore.subscribers import Delivery, SubscriberRunner


class HalfThenHang(AppliedLog):
    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        half = len(deliveries) // 2
        await super().handle(deliveries[:half])
        print(f"MID {len(deliveries)} {half}", flush=True)
        await anyio.sleep_forever()


async def main(url: str, namespace: str, shards: int) -> None:
    settings = load_settings(redis_url=url, namespace=namespace, shards=shards)
    async with EventLog(settings) as log:
        runner = SubscriberRunner(log, HalfThenHang(log), consumer="child", batch=1000,
                                  block_ms=100, claim_idle_ms=400, metrics_interval_s=0.1)
        await runner.run()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
