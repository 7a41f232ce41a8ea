"""Concurrent create_session calls share the shards' group commits: one script call per shard
for what they create in one tick, not one each; a creation with a first input stays one
script call of its own (atomic: the session never exists without its input)."""

from __future__ import annotations

import anyio
import pytest

from eventcore import EventLog
from eventcore.testing.invariants import read_all


async def _script_calls(log: EventLog) -> int:
    info = await log.redis.info("commandstats")
    return int(info.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.single_node  # (INFO commandstats of one server)
async def test_concurrent_creations_share_script_calls(event_log: EventLog) -> None:
    log = event_log
    n = 64
    before = await _script_calls(log)
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(lambda i=i: log.create_session("agent-a", session_id=f"cc{i}"))
    calls = await _script_calls(log) - before
    assert calls <= 2 * log.settings.shards < n
    for i in range(n):
        s = await log.get_session(f"cc{i}")
        assert (s.state, s.agent, s.last_seq) == ("created", "agent-a", 1)
    # creating again answers the existing session, batched or not
    again = await log.create_session("agent-a", session_id="cc3")
    assert again.last_seq == 1 and again.incarnation == (await log.get_session("cc3")).incarnation


async def test_a_creation_with_input_is_one_script_call(event_log: EventLog) -> None:
    log = event_log
    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(lambda i=i: log.create_session("agent-a", session_id=f"ci{i}",
                                                         input={"n": i}))
    for i in range(8):
        got = await read_all(log, f"ci{i}")
        assert [(e.seq, e.type) for e in got] == [(1, "session.created"), (2, "input")]
