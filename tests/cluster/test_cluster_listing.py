"""Listing sessions on a 3-master cluster: every shard's index is read in its own slot and the
pages merged in Python; deletes leave the list."""

from __future__ import annotations

from eventcore import EventLog, SessionFilter, list_sessions


async def test_listing_merges_every_shard(cluster_event_log: EventLog) -> None:
    log = cluster_event_log
    made = [(await log.create_session("a" if i % 2 else "b")).session_id for i in range(48)]
    shards = {log.keys.shard_of(s) for s in made}
    assert len(shards) > 8  # spread over the masters
    seen: list[str] = []
    cursor = None
    while True:
        page = await list_sessions(log, limit=5, cursor=cursor)
        seen += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(made) and len(seen) == len(made)
    assert await log.delete_session(made[0])
    only_b = await list_sessions(log, filters=SessionFilter(agent="b"), limit=1000)
    assert sorted(s.session_id for s in only_b.sessions) == sorted(made[2::2])
