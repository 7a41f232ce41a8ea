"""TaskSet: native asyncio tasks with a task group's guarantees (the worker's session tasks):
the block waits for every task, leaving it early cancels them (anyio's cancellation: what a
task shields still finishes), a failing task cancels the rest and comes out of the block, and
every task runs in a context of its own."""

from __future__ import annotations

import contextvars

import anyio
import anyio.lowlevel
import pytest

from eventcore._tasks import TaskSet
from eventcore.errors import UsageError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_block_waits_for_every_task() -> None:
    done: list[int] = []
    gate = anyio.Event()

    async def job(i: int) -> None:
        await gate.wait()
        done.append(i)

    async with TaskSet() as tasks:
        for i in range(50):
            tasks.start_soon(job, i)
        assert len(tasks) == 50
        gate.set()
    assert sorted(done) == list(range(50))
    assert len(tasks) == 0


async def test_leaving_by_an_exception_cancels_the_tasks_but_not_what_they_shield() -> None:
    started = anyio.Event()
    shielded_done: list[str] = []
    reached_after: list[str] = []

    async def job() -> None:
        with anyio.CancelScope(shield=True):
            started.set()
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            shielded_done.append("settled")
        await anyio.sleep_forever()
        reached_after.append("not cancelled")

    with pytest.raises(RuntimeError, match="body failed"):
        async with TaskSet() as tasks:
            tasks.start_soon(job)
            await started.wait()
            raise RuntimeError("body failed")
    assert shielded_done == ["settled"]
    assert reached_after == []


async def test_cancelling_the_host_cancels_the_tasks() -> None:
    cancelled: list[bool] = []
    running = anyio.Event()

    async def job() -> None:
        try:
            running.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    with anyio.CancelScope() as outer:
        async with TaskSet() as tasks:
            tasks.start_soon(job)
            await running.wait()
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert cancelled == [True]


async def test_a_failing_task_cancels_the_others_and_the_body_and_is_raised() -> None:
    others: list[str] = []
    body: list[str] = []
    waiting = anyio.Event()

    async def sibling() -> None:
        try:
            waiting.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            others.append("cancelled")
            raise

    async def failing() -> None:
        await waiting.wait()
        raise KeyError("boom")

    with pytest.raises(BaseExceptionGroup) as info:
        async with TaskSet() as tasks:
            tasks.start_soon(sibling)
            tasks.start_soon(failing)
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                body.append("cancelled")
                raise
    assert [type(e) for e in info.value.exceptions] == [KeyError]
    assert others == ["cancelled"]
    assert body == ["cancelled"]


async def test_each_task_runs_in_a_context_of_its_own() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []
    first_set = anyio.Event()

    async def first() -> None:
        var.set("first")
        first_set.set()

    async def second() -> None:
        await first_set.wait()
        seen.append(var.get())

    var.set("host")
    async with TaskSet() as tasks:
        tasks.start_soon(first)
        tasks.start_soon(second)
    assert seen == ["host"]  # the host's value, copied at the start; not the first task's
    assert var.get() == "host"


async def test_no_task_starts_outside_the_block() -> None:
    tasks = TaskSet()

    async def job() -> None:
        pass

    with pytest.raises(UsageError):
        tasks.start_soon(job)
    async with tasks:
        tasks.start_soon(job)
    with pytest.raises(UsageError):
        tasks.start_soon(job)


async def test_a_task_started_while_the_block_waits_is_waited_for_too() -> None:
    # as with anyio: a worker's reclaim or takeover (another task) may host a session after
    # the consuming body returned, while the set waits for the sessions it has
    done: list[str] = []
    tasks = TaskSet()

    async def late() -> None:
        await anyio.lowlevel.checkpoint()
        done.append("late")

    async def first() -> None:
        # a task runs from the next tick on: the body has left the block by now, the set is
        # waiting for its tasks
        tasks.start_soon(late)
        done.append("first")

    async with tasks:
        tasks.start_soon(first)
    assert done == ["first", "late"]
    assert len(tasks) == 0
