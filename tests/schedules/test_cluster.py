"""Schedules on a local 3-master Redis Cluster: the fire script touches the schedule and the
session it creates in one slot, on every master."""

from __future__ import annotations

import datetime as dt

import anyio
from redis.crc import key_slot

from eventcore import EventLog
from eventcore.schedules import Scheduler, Schedules, occurrence_session_id
from eventcore.testing.invariants import read_all

T0 = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=dt.UTC).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_schedules_fire_once_on_every_shard_of_a_cluster(cluster_event_log: EventLog
                                                                ) -> None:
    log = cluster_event_log
    keys = log.keys
    ids: dict[int, str] = {}
    i = 0
    while len(ids) < keys.shards:  # one schedule on each of the 16 shards (all 3 masters)
        ids.setdefault(keys.schedule_shard(f"c{i}"), f"c{i}")
        i += 1
    masters = {log.redis.get_node_from_key(keys.schedule(sid)).name  # type: ignore[union-attr]
               for sid in ids.values()}
    assert len(masters) == 3
    clock = Clock(T0)
    s = Schedules(log, now=clock)
    for sid in ids.values():
        await s.create(sid, cron="* * * * *", agent="echo", input={"hi": sid})
    schedulers = [Scheduler(log, now=clock, grace_s=600) for _ in range(3)]
    for _ in range(4):
        clock.t += 60
        async with anyio.create_task_group() as tg:
            for sch in schedulers:
                tg.start_soon(sch.tick)
    assert sum(x.fired for x in schedulers) == 4 * len(ids)
    for sid in ids.values():
        got = await s.get(sid)
        assert got.fired == 4
        for m in range(1, 5):
            occ = int((dt.datetime(2026, 6, 1, 12, m, tzinfo=dt.UTC)).timestamp() * 1000)
            session = occurrence_session_id(keys, sid, occ)
            assert key_slot(keys.session(session).meta.encode()) == key_slot(
                keys.schedule(sid).encode())
            events = await read_all(log, session)
            assert [e.type for e in events] == ["session.created", "input"]
            assert events[1].payload == {"hi": sid}
