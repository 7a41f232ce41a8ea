"""Failover honesty: a master SIGKILLed right after acknowledged appends, its replica promoted.

Default (asynchronous replication): the replica is stopped (SIGSTOP) and its link cut while
the appends are acknowledged, so the promoted replica deterministically lacks them and new
appends reuse their seqs; every follower that saw the lost seqs gets the reset
(``HistoryDiverged``) and then the new history, never a silent gap or rewritten seqs.
Replicated (``EVENTCORE_APPEND_REPLICAS=1``):
no acknowledged append is lost, and an append its replica cannot confirm is refused
(``AppendNotReplicated``) and safe to retry.

Single node: the same detection (a shard whose write counter is behind what the writer was
answered; a reader beyond the tail), and WAIT on a node with a replica.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from cluster_support import fail_over, master_with_replica, sessions_on, stopped

from eventcore import (
    AppendNotReplicated,
    Envelope,
    EventLog,
    HistoryDiverged,
    HistoryGone,
    load_settings,
)
from eventcore._follow import Event, LogFollowers
from eventcore.testing._server import LocalCluster, RedisServer
from eventcore.testing.invariants import assert_acknowledged_present, check_log, read_all

pytestmark = pytest.mark.redis_restart

Item = Event | HistoryGone


async def _wait_for(check: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(60):
        while not check():  # noqa: ASYNC110 - several followers' state, checked as a whole
            await anyio.sleep(0.02)
    assert check(), what


async def _follow(log: EventLog, sid: str, into: list[Item]) -> None:
    followers = LogFollowers(log, block_ms=300)
    async with followers.subscribe(sid, 0, until_ended=False, retry_cap_s=0.5) as f:
        async for batch in f.batches():
            if isinstance(batch, HistoryGone):
                into.append(batch)
            else:
                into.extend(batch)


def _cursor(items: list[Item]) -> int:
    for item in reversed(items):
        if isinstance(item, HistoryGone):
            return item.resume_after
        return item.seq
    return 0


def _payload(ev: Event) -> Any:
    return ev.envelope().payload


async def test_default_mode_every_reader_of_the_lost_seqs_is_reset(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory(replicas=1, node_timeout_ms=2000)
    settings = load_settings(redis_url=cluster.url, namespace="honest", shards=16,
                             retry_budget_s=40)
    async with EventLog(settings) as log, anyio.create_task_group() as tg:
        victim = cluster.masters()[0]
        replica = cluster.replica_of(victim)
        sessions = sessions_on(cluster, log, victim, 3, "d")
        for sid in sessions:
            await log.create_session(session_id=sid)
            await log.append_many([Envelope(type="m", session_id=sid, payload=["kept", i])
                                   for i in range(4)])  # seqs 2..5
        await anyio.to_thread.run_sync(cluster.wait_synced)
        seen: dict[str, list[Item]] = {sid: [] for sid in sessions}
        for sid in sessions:
            tg.start_soon(_follow, log, sid, seen[sid])
        await _wait_for(lambda: all(_cursor(v) == 5 for v in seen.values()), "caught up")

        with stopped(replica):
            # and its link cut from the master's side: what it holds in its socket buffer
            # (all from before this point) is all it will ever get from this master
            await anyio.to_thread.run_sync(
                lambda: victim.command("CLIENT", "KILL", "TYPE", "replica"))
            for sid in sessions:  # acknowledged by the master, never replicated: seqs 6..10
                got = await log.append_many([Envelope(type="m", session_id=sid,
                                                      payload=["lost", i]) for i in range(5)])
                assert [r.seq for r in got] == [6, 7, 8, 9, 10]
            await _wait_for(lambda: all(_cursor(v) == 10 for v in seen.values()),
                            "the followers saw the appends the failover will lose")
            victim.kill()
        await fail_over(cluster, victim, replica)

        for sid in sessions:  # the promoted replica ends at 5: these reuse seqs 6..13
            got = await log.append_many([Envelope(type="m", session_id=sid, payload=["new", i])
                                         for i in range(8)])
            assert [r.seq for r in got] == list(range(6, 14))
        await _wait_for(lambda: all(_cursor(v) == 13 and any(
            isinstance(i, HistoryDiverged) for i in v) for v in seen.values()),
            "every follower reset and on the new history")
        tg.cancel_scope.cancel()

    for sid, items in seen.items():
        resets = [i for i, item in enumerate(items) if isinstance(item, HistoryGone)]
        assert len(resets) == 1, (sid, items)
        at = resets[0]
        reset = items[at]
        assert isinstance(reset, HistoryDiverged) and reset.resume_after == 5, reset
        assert reset.after == 10 and reset.epoch != "0"
        before = [e for e in items[:at] if isinstance(e, Event)]
        after = [e for e in items[at + 1:] if isinstance(e, Event)]
        # what it saw before: exactly the old history, the lost seqs included
        assert [e.seq for e in before] == list(range(1, 11))
        assert [_payload(e)[0] for e in before[1:]] == ["kept"] * 4 + ["lost"] * 5
        # after the reset: the new history from the restart point, nothing else
        assert [e.seq for e in after] == list(range(6, 14))
        assert [_payload(e) for e in after] == [["new", i] for i in range(8)]
        assert {e.epoch for e in after} == {reset.epoch}


async def test_replicated_mode_loses_no_acknowledged_append(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory(replicas=1, node_timeout_ms=2000)
    settings = load_settings(redis_url=cluster.url, namespace="repl", shards=16,
                             retry_budget_s=40, append_replicas=1,
                             append_replicas_timeout_ms=1000)
    async with EventLog(settings) as log:
        victim = cluster.masters()[0]
        replica = cluster.replica_of(victim)
        sessions = sessions_on(cluster, log, victim, 3, "r")
        acked: dict[str, dict[str, int]] = {sid: {} for sid in sessions}
        for sid in sessions:
            await log.create_session(session_id=sid)

        async def produce(sid: str) -> None:
            for i in range(20):  # one by one: group commit, one WAIT per batch
                r = await log.emit(sid, "m", ["acked", i], event_key=f"k{i}")
                acked[sid][r.event_key] = r.seq

        async with anyio.create_task_group() as tg:
            for sid in sessions:
                tg.start_soon(produce, sid)
        # a replica that cannot confirm: the append is refused, not acknowledged
        with stopped(replica), pytest.raises(AppendNotReplicated) as refused:
            await log.emit(sessions[0], "m", "unconfirmed", event_key="maybe")
        assert refused.value.wanted == 1 and refused.value.replicas == 0
        # no wait for the replica here: what WAIT confirmed is on it already
        await fail_over(cluster, victim, replica)
        assert cluster.node_of_slot(cluster.keyslot(log.keys.session(sessions[0]).stream)) \
            is replica
        # the promoted master has no replica yet: nothing it takes is acknowledged
        with pytest.raises(AppendNotReplicated) as alone:
            await log.emit(sessions[0], "m", "unconfirmed", event_key="maybe")
        assert alone.value.replicas == 0
        # the old master comes back as the new one's replica
        await anyio.to_thread.run_sync(victim.start)
        with anyio.fail_after(60):
            while "state=online" not in replica.command("INFO", "replication"):  # noqa: ASYNC110
                await anyio.sleep(0.05)  # replication has no notification to await
            # the refused append retried with its key until acknowledged (the new replica may
            # still be loading what it was sent): one copy, whether the first survived or not
            while True:
                try:
                    again = await log.emit(sessions[0], "m", "unconfirmed", event_key="maybe")
                    break
                except AppendNotReplicated:
                    continue
        for sid in sessions:
            full = await read_all(log, sid)
            check_log(full)
            assert_acknowledged_present(full, acked[sid])
            assert len(full) == 1 + 20 + (sid == sessions[0])
        assert (await read_all(log, sessions[0]))[-1].event_key == "maybe"
        assert again.seq == 22


# -- single node --------------------------------------------------------------------------------

async def test_a_shard_behind_the_writer_changes_generation(event_log: EventLog) -> None:
    """What a failover that lost writes looks like to the append script: the shard's write
    counter below what this writer was answered. The next append bumps the generation; a
    reader that held a seq above the tail is reset, one at or below it adopts the new epoch."""
    log = event_log
    sid = (await log.create_session()).session_id
    await log.append_many([Envelope(type="m", session_id=sid, payload=i) for i in range(9)])
    shard = log.keys.shard_of(sid)
    assert log.appender.writes[shard] >= 2
    # no generation while nothing diverged: the entries carry none
    plain = await _page_events(log, sid, 0)
    assert {e.generation for e in plain} == {""}
    # a "failover": the shard's counter went back; the session's tail too (seqs 8..10 lost)
    await log.redis.hset(log.keys.epoch(shard), "wc", 0)
    await _keep_first(log, sid, 7)
    r = await log.emit(sid, "m", "new")
    assert r.seq == 8
    page = await _page_events(log, sid, 7)
    assert page[0].generation != "" and page[0].good_to == 7
    for cursor, gen, expect in [(10, "", "reset"), (7, "", "adopt"), (3, "", "adopt")]:
        items = await _follow_once(log, sid, cursor, gen, until=8)
        if expect == "reset":
            assert isinstance(items[0], HistoryDiverged) and items[0].resume_after == 7
            assert [e.seq for e in items[1:] if isinstance(e, Event)] == [8]
        else:
            assert not any(isinstance(i, HistoryGone) for i in items)
            assert [e.seq for e in items if isinstance(e, Event)] == list(range(cursor + 1, 9))


async def test_a_reader_beyond_the_tail_is_reset_and_marks_the_stream(
    event_log: EventLog,
) -> None:
    """Last-Event-ID 999 on a 34-event session: a reset to 34 (not a silent wait for seq
    1000); the session gets a generation, so the seqs appended next carry it."""
    log = event_log
    sid = (await log.create_session()).session_id
    await log.append_many([Envelope(type="m", session_id=sid, payload=i) for i in range(33)])
    items = await _follow_once(log, sid, 999, "", until=34, append_at_reset=True)
    reset = items[0]
    assert isinstance(reset, HistoryDiverged)
    assert (reset.after, reset.resume_after) == (999, 34) and reset.epoch != "0"
    (ev,) = [e for e in items if isinstance(e, Event)]
    assert ev.seq == 35 and ev.generation == reset.epoch and ev.good_to == 34


async def test_wait_on_a_single_node_with_a_replica(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    master, replica = await master_with_replica(redis_server_factory)
    settings = load_settings(redis_url=master.url, namespace="w", shards=2, retry_budget_s=5,
                             append_replicas=1, append_replicas_timeout_ms=300)
    async with EventLog(settings) as log:
        sid = (await log.create_session()).session_id
        r = await log.emit(sid, "m", 1, event_key="a")
        # acknowledged means the replica has it now, without waiting for it
        stream = log.keys.session(sid).stream
        assert replica.command("XLEN", stream).strip() == "2"
        assert r.seq == 2
        with stopped(replica):
            with pytest.raises(AppendNotReplicated):
                await log.emit(sid, "m", 2, event_key="b")
            with pytest.raises(AppendNotReplicated):  # the retry is no more acknowledged
                await log.emit(sid, "m", 2, event_key="b")
        again = await log.emit(sid, "m", 2, event_key="b")
        assert again.duplicate and again.seq == 3
        assert [e.event_key for e in await read_all(log, sid)][1:] == ["a", "b"]


async def _keep_first(log: EventLog, sid: str, n: int) -> None:
    """The session as a promoted replica that lacked all but its first ``n`` events has it:
    the stream rebuilt with those (its last id then is theirs), the meta's seq at ``n``."""
    keys = log.keys.session(sid)
    kept = await log.redis.xrange(keys.stream, "-", f"0-{n}")
    async with log.redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.stream)
        for entry_id, fields in kept:
            pipe.xadd(keys.stream, fields, id=entry_id)
        pipe.hset(keys.meta, "seq", n)
        await pipe.execute()


async def _page_events(log: EventLog, sid: str, after: int) -> list[Event]:
    inc = (await log.incarnations([sid]))[sid]
    assert inc is not None
    events, _ = await LogFollowers(log).pages.read(sid, after, incarnation=inc)
    return events


async def _follow_once(log: EventLog, sid: str, cursor: int, generation: str, *, until: int,
                       append_at_reset: bool = False) -> list[Item]:
    items: list[Item] = []
    followers = LogFollowers(log, block_ms=200)
    with anyio.fail_after(30):
        async with followers.subscribe(sid, cursor, until_ended=False) as f:
            f.generation = generation
            async for batch in f.batches():
                if isinstance(batch, HistoryGone):
                    items.append(batch)
                    if append_at_reset:
                        await log.emit(sid, "m", "after the reset")
                        until += 1
                else:
                    items.extend(batch)
                if f.cursor >= until:
                    return items
    return items
