"""Group commit: calls of one tick go to Redis as one round trip per shard (here: a real Redis
pipeline of INCRs), each caller gets its own answer, and a caller cancelled while its batch is
in flight never costs a batch mate its answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from eventcore._coalesce import ShardCoalescer
from eventcore.errors import UsageError

# a plain single-node client counts round trips (INCR on one node) as the test tool
pytestmark = pytest.mark.single_node


class Counter:
    """``send`` INCRs one key per item in one pipeline; the answer is the item's new count.
    ``gate`` (when set) holds every round trip until opened."""

    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        self.redis, self.key = redis, key
        self.batches: list[list[int]] = []
        self.gate: anyio.Event | None = None
        self.in_flight = anyio.Event()

    async def send(self, shard: int, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        self.in_flight.set()
        if self.gate is not None:
            await self.gate.wait()
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            pipe.incr(f"{self.key}:{shard}:{item}")
        answers: list[int | BaseException] = list(await pipe.execute())
        return [ValueError(f"odd {i}") if i % 7 == 6 else a for i, a in zip(items, answers,
                                                                          strict=True)]


@pytest.fixture
async def counter(redis_url: str) -> AsyncIterator[Counter]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield Counter(client, f"coalesce-{id(client)}")
    finally:
        await client.aclose()


async def test_one_round_trip_per_tick_and_every_answer_is_its_own(counter: Counter) -> None:
    co: ShardCoalescer[int, int] = ShardCoalescer(counter.send, max_batch=64)
    results: dict[int, object] = {}

    async def call(i: int) -> None:
        try:
            results[i] = await co.submit(i % 2, i)
        except ValueError as exc:
            results[i] = str(exc)

    async with co, anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(call, i)
    assert results == {i: (f"odd {i}" if i % 7 == 6 else 1) for i in range(300)}
    assert sorted(i for b in counter.batches for i in b) == list(range(300))
    assert max(len(b) for b in counter.batches) <= 64
    assert len(counter.batches) < 300 / 4  # coalesced, not one round trip per call
    for b in counter.batches:  # each batch is one shard's, in submission order
        assert len({i % 2 for i in b}) == 1 and b == sorted(b)


async def test_a_caller_cancelled_mid_flight_costs_no_batch_mate_its_answer(
    counter: Counter,
) -> None:
    co: ShardCoalescer[int, int] = ShardCoalescer(counter.send, max_batch=8)
    counter.gate = anyio.Event()
    got: dict[int, int] = {}

    async def call(i: int) -> None:
        got[i] = await co.submit(0, i)

    async with co, anyio.create_task_group() as tg:
        leader = anyio.CancelScope()

        async def lead() -> None:
            with leader:
                await co.submit(0, 100)

        tg.start_soon(lead)
        await counter.in_flight.wait()  # the leader's round trip is under way...
        for i in range(5):
            tg.start_soon(call, i)  # ... these queue for the next one
        await anyio.wait_all_tasks_blocked()
        leader.cancel()
        await anyio.wait_all_tasks_blocked()
        counter.gate.set()
    assert leader.cancelled_caught
    assert got == {i: 1 for i in range(5)}
    assert counter.batches == [[100], [0, 1, 2, 3, 4]]
    assert await counter.redis.get(f"{counter.key}:0:100") == b"1"  # the leader's was sent


async def test_leaving_sends_what_is_queued_even_when_cancelled(counter: Counter) -> None:
    """The owner's scope is cancelled while a round trip is in flight and more are queued:
    leaving the block still sends and answers all of them (shielded), then ends."""
    co: ShardCoalescer[int, int] = ShardCoalescer(counter.send, max_batch=2)
    counter.gate = anyio.Event()
    got: dict[int, object] = {}

    async def call(i: int) -> None:
        try:
            got[i] = await co.submit(0, i)
        except BaseException as exc:  # the callers are cancelled with the owner
            got[i] = type(exc).__name__
            raise

    with anyio.CancelScope() as owner:
        async with co, anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, i)
            await counter.in_flight.wait()
            await anyio.wait_all_tasks_blocked()
            owner.cancel()
            counter.gate.set()
    assert owner.cancelled_caught
    # every item went to Redis exactly once, in order, whatever its caller saw
    assert [i for b in counter.batches for i in b] == [0, 1, 2, 3, 4]
    for i in range(5):
        assert await counter.redis.get(f"{counter.key}:0:{i}") == b"1"


async def test_submit_outside_the_lifetime_is_a_usage_error(counter: Counter) -> None:
    co: ShardCoalescer[int, int] = ShardCoalescer(counter.send, max_batch=2)
    with pytest.raises(UsageError):
        await co.submit(0, 1)
    async with co:
        assert await co.submit(0, 1) == 1
    with pytest.raises(UsageError):
        await co.submit(0, 2)
    assert counter.batches == [[1]]


async def test_an_idle_flush_loop_is_woken_for_the_next_batch_and_ended_on_leaving(
    counter: Counter,
) -> None:
    """A shard's flush loop outlives its round trip (idle, waiting for the next item): items
    queued after it went idle are sent, and leaving the block, with an error or cancelled,
    ends the idle loops instead of waiting for them forever."""
    co: ShardCoalescer[int, int] = ShardCoalescer(counter.send, max_batch=8)
    with pytest.raises(BaseExceptionGroup) as failed:
        async with co:
            for i in range(3):  # one after another: the loop goes idle between them
                assert await co.submit(0, i) == 1
            assert await co.submit(1, 3) == 1
            raise RuntimeError("the owner fails")
    assert [type(e) for e in failed.value.exceptions] == [RuntimeError]
    assert counter.batches == [[0], [1], [2], [3]]
    with anyio.CancelScope() as owner:
        async with ShardCoalescer(counter.send, max_batch=8) as co2:
            assert await co2.submit(0, 10) == 1
            owner.cancel()
            await anyio.sleep_forever()
    assert owner.cancelled_caught
