"""Listing sessions (eventcore.list_sessions): the per-shard index written by the creating
script, newest first, filters, cursor pages stable under concurrent creates, deletes and
expiries leave the list."""

from __future__ import annotations

import datetime as _dt

import anyio
import pytest

from eventcore import (
    EventLog,
    SessionFilter,
    ValidationError,
    list_sessions,
)
from eventcore._listing import decode_cursor, encode_cursor


async def _all(log: EventLog, filters: SessionFilter | None = None, limit: int = 7,
               budget: int = 5000) -> list[str]:
    out: list[str] = []
    cursor = None
    for _ in range(10_000):
        page = await list_sessions(log, filters=filters, limit=limit, cursor=cursor,
                                   budget=budget)
        assert len(page.sessions) <= limit
        out += [s.session_id for s in page.sessions]
        cursor = page.next_cursor
        if cursor is None:
            return out
    raise AssertionError("the listing never ended")


async def test_index_written_by_create_removed_by_delete(event_log: EventLog) -> None:
    s = await event_log.create_session("a")
    index = event_log.keys.sessions(event_log.keys.shard_of(s.session_id))
    score = await event_log.redis.zscore(index, s.session_id)
    assert score is not None and int(score) == int(s.incarnation)
    assert await event_log.delete_session(s.session_id)
    assert await event_log.redis.zscore(index, s.session_id) is None


async def test_newest_first_every_session_once_across_pages(event_log: EventLog) -> None:
    made = [(await event_log.create_session("a", session_id=f"s{i:03}")).session_id
            for i in range(40)]
    assert await _all(event_log, limit=7) == made[::-1]
    first = await list_sessions(event_log, limit=1)
    assert first.sessions[0].session_id == "s039" and first.next_cursor is not None
    whole = await list_sessions(event_log, limit=1000)
    assert [s.session_id for s in whole.sessions] == made[::-1] and whole.next_cursor is None


async def test_pages_stable_under_concurrent_creates_and_deletes(event_log: EventLog) -> None:
    before = [(await event_log.create_session("a")).session_id for _ in range(30)]
    seen: list[str] = []
    page = await list_sessions(event_log, limit=5)
    seen += [s.session_id for s in page.sessions]
    deleted = before[10]
    assert await event_log.delete_session(deleted)
    while page.next_cursor is not None:
        for _ in range(3):  # new sessions while the listing goes on
            await event_log.create_session("a")
        page = await list_sessions(event_log, limit=5, cursor=page.next_cursor)
        seen += [s.session_id for s in page.sessions]
    assert len(seen) == len(set(seen))
    assert seen == [s for s in before[::-1] if s != deleted]


async def test_filters(event_log: EventLog) -> None:
    a1 = await event_log.create_session("alpha", labels={"team": "x", "tier": "gold"})
    b1 = await event_log.create_session("beta", labels={"team": "y"})
    a2 = await event_log.create_session("alpha", labels={"team": "y"})
    await event_log.end_session(b1.session_id)
    noise = [(await event_log.create_session("noise", labels={"n": str(i % 3)})).session_id
             for i in range(20)]

    async def ids(**kw: object) -> list[str]:
        return await _all(event_log, SessionFilter(**kw), limit=2)  # type: ignore[arg-type]

    assert await ids(agent="alpha") == [a2.session_id, a1.session_id]
    assert await ids(states=frozenset({"ended"})) == [b1.session_id]
    assert await ids(labels={"team": "y"}) == [a2.session_id, b1.session_id]
    assert await ids(labels={"tier": None}) == [a1.session_id]
    assert await ids(agent="alpha", labels={"team": "y"}) == [a2.session_id]
    assert a1.created_at is not None and a2.created_at is not None
    assert await ids(agent="alpha", created_after=a2.created_at) == [a2.session_id]
    assert await ids(agent="alpha", created_before=a2.created_at) == [a1.session_id]
    future = _dt.datetime.now(_dt.UTC) + _dt.timedelta(hours=1)
    assert await ids(created_after=future) == []
    # many matches, pages of 2: each once, in order (pages end inside a pre-filtered batch)
    assert await ids(agent="noise") == noise[::-1]
    assert await ids(labels={"n": "1"}) == [s for i, s in enumerate(noise) if i % 3 == 1][::-1]
    for budget in (1, 3, 7):
        got = await _all(event_log, SessionFilter(labels={"n": "2"}), limit=2, budget=budget)
        assert got == [s for i, s in enumerate(noise) if i % 3 == 2][::-1]
    # a small budget: short pages that still get through everything
    got = await _all(event_log, SessionFilter(agent="alpha"), limit=2, budget=3)
    assert got == [a2.session_id, a1.session_id]


async def test_expired_sessions_leave_the_list_and_the_index(event_log: EventLog) -> None:
    keep = await event_log.create_session("a")
    gone = await event_log.create_session("a", ttl_s=1)
    await event_log.end_session(gone.session_id)
    meta = event_log.keys.session(gone.session_id).meta
    with anyio.fail_after(10):
        while await event_log.redis.exists(meta):  # noqa: ASYNC110 - a TTL, no event
            await anyio.sleep(0.1)  # Redis expires the keys; nothing to await but its clock
    assert await _all(event_log) == [keep.session_id]
    index = event_log.keys.sessions(event_log.keys.shard_of(gone.session_id))
    assert await event_log.redis.zscore(index, gone.session_id) is None


async def test_recreated_session_listed_once(event_log: EventLog) -> None:
    s = await event_log.create_session("a", session_id="again")
    other = await event_log.create_session("a")
    assert await event_log.delete_session(s.session_id)
    again = await event_log.create_session("b", session_id="again")
    page = await list_sessions(event_log)
    assert [(x.session_id, x.incarnation) for x in page.sessions] == [
        ("again", again.incarnation), (other.session_id, other.incarnation)]


@pytest.mark.parametrize("cursor", [
    "", "x", "!!!!", "e30", encode_cursor(1, "s", "other-digest"),
    encode_cursor(1, "bad id!", SessionFilter().digest()),
    encode_cursor(-1, "s", SessionFilter().digest()), "A" * 600,
])
async def test_hostile_cursor_is_a_validation_error(event_log: EventLog, cursor: str) -> None:
    with pytest.raises(ValidationError):
        await list_sessions(event_log, cursor=cursor)


def test_cursor_round_trip_and_filter_binding() -> None:
    flt = SessionFilter(agent="a")
    c = encode_cursor(123, "s_1", flt.digest())
    assert decode_cursor(c, flt.digest()) == (123, "s_1")
    with pytest.raises(ValidationError, match="other filters"):
        decode_cursor(c, SessionFilter(agent="b").digest())
    with pytest.raises(ValidationError):
        SessionFilter(states=frozenset({"nope"}))
    now = _dt.datetime.now(_dt.UTC)
    with pytest.raises(ValidationError):
        SessionFilter(created_after=now, created_before=now)
