"""Three scheduler processes against one Redis, on a clock the test advances (a file they read):
a run of minutely occurrences of many schedules fires every occurrence exactly once, while one
process is SIGKILLed in the middle of firing a backlog and while Redis is killed and restarted."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from eventcore import EventLog, load_settings
from eventcore.schedules import Schedules
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import RedisServer

HERE = Path(__file__).parent
T0 = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=dt.UTC).timestamp()
N = 20  # schedules, every minute

pytestmark = pytest.mark.redis_restart


class Fleet:
    def __init__(self, url: str, namespace: str, clock: Path) -> None:
        self.args = [sys.executable, str(HERE / "scheduler_proc.py"), url, namespace, str(clock)]
        self.procs: list[subprocess.Popen[str]] = []
        self.clock = clock

    def start(self, n: int) -> None:
        for _ in range(n):
            proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True,
                                    env={**os.environ})
            self.procs.append(proc)
        for proc in self.procs[-n:]:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"

    def set_clock(self, t: float) -> None:
        tmp = self.clock.with_suffix(".tmp")
        tmp.write_text(repr(t))
        os.replace(tmp, self.clock)  # atomic: a reader sees the old time or the new

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def fleet(tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
          ) -> Iterator[tuple[Fleet, RedisServer, str]]:
    server = redis_server_factory()
    ns = unique_namespace()
    clock = tmp_path / "clock"
    f = Fleet(server.url, ns, clock)
    f.set_clock(T0)
    try:
        yield f, server, ns
    finally:
        f.stop()


async def _wait(check: Callable[[], Awaitable[bool]], what: str, within: float = 60.0
                ) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.005)


async def _fired(log: EventLog) -> int:
    total = 0
    for s in await Schedules(log).list():
        total += s.fired
    return total


async def _occurrences(log: EventLog) -> Counter[tuple[str, str]]:
    seen: Counter[tuple[str, str]] = Counter()
    async for key in log.redis.scan_iter(match=f"{log.keys.namespace}:*:meta:sch.*", count=1000):
        info = await log.get_session(key.decode().split(":meta:", 1)[1])
        seen[(info.labels["schedule"], info.labels["occurrence"])] += 1
    return seen


def _minute(i: int) -> str:
    return (dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=i)
            ).isoformat().replace("+00:00", "Z")


async def test_three_processes_fire_each_occurrence_once_through_kills_and_restarts(
    fleet: tuple[Fleet, RedisServer, str],
) -> None:
    f, server, ns = fleet
    settings = load_settings(redis_url=server.url, namespace=ns, shards=4, retry_budget_s=30)
    async with EventLog(settings) as log:
        schedules = Schedules(log, now=lambda: T0)
        for i in range(N):
            await schedules.create(f"m{i:02d}", cron="* * * * *", agent="echo", catchup="all",
                                   input={"i": i})
        f.start(3)
        minute = 0

        def advance(to: int) -> None:
            nonlocal minute
            minute = to
            f.set_clock(T0 + 60 * to)

        async def all_fired() -> bool:
            return await _fired(log) == N * minute

        # 1. minutes 1..5 one at a time, all three running
        for m in range(1, 6):
            advance(m)
            await _wait(all_fired, f"minute {minute}")

        # 2. SIGKILL mid-fire: only the victim runs, the clock jumps 30 minutes (a backlog of
        #    600 occurrences), and it is killed once it has fired some but not all of them
        victim, *others = f.procs
        for p in others:
            p.send_signal(signal.SIGSTOP)
        base = N * minute
        advance(minute + 30)

        async def started() -> bool:
            return await _fired(log) > base

        await _wait(started, "the victim to start firing")
        victim.kill()
        victim.wait()
        mid = await _fired(log)
        assert base < mid < N * minute, "the kill did not land mid-fire"
        for p in others:
            p.send_signal(signal.SIGCONT)
        await _wait(all_fired, "the others to finish the backlog")

        # 3. Redis killed (SIGKILL; the AOF is fsynced at every write) and restarted in the
        #    middle of a backlog
        base = N * minute
        advance(minute + 5)
        await _wait(started, "firing to start")
        server.restart(hard=True)
        await _wait(all_fired, "firing to resume after the restart", 90)

        # 4. a few more minutes with a fresh process joining the two survivors
        f.start(1)
        for _ in range(3):
            advance(minute + 1)
            await _wait(all_fired, f"minute {minute}")

    async with EventLog(settings) as log:
        seen = await _occurrences(log)
        assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1]
        assert set(seen) == {(f"m{i:02d}", _minute(m)) for i in range(N)
                             for m in range(1, minute + 1)}
        for s in await Schedules(log).list():
            assert s.fired == minute and s.skipped == 0
            assert s.next_run_at == dt.datetime(2026, 6, 1, 12, minute + 1, tzinfo=dt.UTC)
