"""Sessions: create (idempotent), get, end, delete, TTL, lifecycle states and dispatch."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from eventcore import EventLog, SessionNotFound, ValidationError, load_settings
from eventcore.testing._server import RedisServer
from eventcore.testing.invariants import read_all


async def test_create_and_get(event_log: EventLog) -> None:
    s = await event_log.create_session("support", labels={"team": "a"}, input={"q": "hi"})
    assert s.state == "created" and s.agent == "support" and s.labels == {"team": "a"}
    assert s.last_seq == 2 and s.epoch == 0 and s.created_at is not None
    got = await event_log.get_session(s.session_id)
    assert got.session_id == s.session_id and got.state == "created"
    log = await read_all(event_log, s.session_id)
    assert [(e.seq, e.type) for e in log] == [(1, "session.created"), (2, "input")]
    assert log[0].payload == {"agent": "support", "labels": {"team": "a"}, "input": {"q": "hi"}}
    assert log[1].payload == {"q": "hi"}
    # with an agent, creation dispatched it in the same script
    dispatch = await event_log.redis.xrange(event_log.keys.session(s.session_id).dispatch)
    assert [f[b"sid"].decode() for _, f in dispatch] == [s.session_id]
    assert (await event_log.redis.hget(event_log.keys.session(s.session_id).meta,
                                       "dispatched")) == b"1"


async def test_create_is_idempotent(event_log: EventLog) -> None:
    a = await event_log.create_session("x", idempotency_key="order-17", input="go")
    b = await event_log.create_session("x", idempotency_key="order-17", input="go")
    assert a.session_id == b.session_id
    assert [e.seq for e in await read_all(event_log, a.session_id)] == [1, 2]
    c = await event_log.create_session("x", idempotency_key="order-18")
    assert c.session_id != a.session_id
    # an explicit id is idempotent too, and so are concurrent creators
    ids = []

    async def create() -> None:
        ids.append((await event_log.create_session("x", session_id="fixed-1")).session_id)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(create)
    assert ids == ["fixed-1"] * 10
    assert [e.seq for e in await read_all(event_log, "fixed-1")] == [1]
    dispatch = await event_log.redis.xrange(event_log.keys.session("fixed-1").dispatch)
    assert [f[b"sid"] for _, f in dispatch].count(b"fixed-1") == 1


async def test_get_missing(event_log: EventLog) -> None:
    with pytest.raises(SessionNotFound):
        await event_log.get_session("never-created")


async def test_end_twice_returns_the_first(event_log: EventLog) -> None:
    s = await event_log.create_session()
    first = await event_log.end_session(s.session_id, "done")
    second = await event_log.end_session(s.session_id, "again")
    assert (first.seq, first.duplicate) == (2, False)
    assert (second.seq, second.duplicate) == (2, True)
    info = await event_log.get_session(s.session_id)
    assert info.state == "ended" and info.ended_at is not None and info.last_seq == 2
    log = await read_all(event_log, s.session_id)
    assert log[-1].payload == {"reason": "done"}


async def test_delete(event_log: EventLog) -> None:
    s = await event_log.create_session()
    await event_log.signal(s.session_id, "k", 1)
    assert await event_log.delete_session(s.session_id) is True
    with pytest.raises(SessionNotFound):
        await event_log.get_session(s.session_id)
    assert await event_log.read(s.session_id) == []
    assert await event_log.latest_signals(s.session_id) == {}
    assert await event_log.delete_session(s.session_id) is False
    keys = event_log.keys.session(s.session_id)
    assert await event_log.redis.exists(*keys.per_session) == 0


async def test_ttl_applies_only_after_end(event_log: EventLog) -> None:
    s = await event_log.create_session(ttl_s=500)
    await event_log.append_many([])  # an empty batch is a no-op
    await event_log.signal(s.session_id, "k", 1)
    await event_log.emit(s.session_id, "message", 1, event_key="user-key")
    keys = event_log.keys.session(s.session_id)
    owned = (keys.stream, keys.meta, keys.dedupe, keys.signals)
    assert [await event_log.redis.ttl(k) for k in owned] == [-1] * 4
    await event_log.end_session(s.session_id)
    ttls = [await event_log.redis.ttl(k) for k in owned]
    assert all(0 < t <= 500 for t in ttls), ttls


async def test_ttl_expiry_after_end(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()
    admin = aioredis.Redis.from_url(server.url)
    await admin.config_set("notify-keyspace-events", "Ex")
    settings = load_settings(redis_url=server.url, namespace="ttl", shards=2)
    async with EventLog(settings) as log, admin.pubsub() as ps:
        s = await log.create_session(ttl_s=1)
        keep = await log.create_session(ttl_s=1)  # not ended: never expires
        meta = log.keys.session(s.session_id).meta
        await ps.subscribe("__keyevent@0__:expired")
        await log.end_session(s.session_id)
        expired: set[bytes] = set()
        with anyio.fail_after(30):
            async for msg in ps.listen():  # the server tells us when the key expires
                if msg["type"] == "message":
                    expired.add(msg["data"])
                    if meta.encode() in expired:
                        break
        with pytest.raises(SessionNotFound):
            await log.get_session(s.session_id)
        assert await log.read(s.session_id) == []
        assert (await log.get_session(keep.session_id)).state == "created"
    await admin.aclose()


async def test_input_to_idle_session_dispatches_once(event_log: EventLog) -> None:
    s = await event_log.create_session()  # no agent: no dispatch at creation
    keys = event_log.keys.session(s.session_id)
    sid = s.session_id.encode()
    assert not [e for e in await event_log.redis.xrange(keys.dispatch) if e[1][b"sid"] == sid]
    # a worker unloads it (what the workers' release script does)
    await event_log.redis.hset(keys.meta, mapping={"state": "idle", "host": ""})
    await event_log.emit(s.session_id, "input", "wake up")
    await event_log.emit(s.session_id, "input", "still there?")
    await event_log.emit(s.session_id, "message", "not an input")
    ours = [e for e in await event_log.redis.xrange(keys.dispatch) if e[1][b"sid"] == sid]
    assert [e[1][b"reason"] for e in ours] == [b"input"]
    info = await event_log.get_session(s.session_id)
    assert info.state == "idle"


async def test_states_round_trip(event_log: EventLog) -> None:
    s = await event_log.create_session()
    keys = event_log.keys.session(s.session_id)
    for state in ("active", "idle"):
        await event_log.redis.hset(keys.meta, "state", state)
        assert (await event_log.get_session(s.session_id)).state == state
    await event_log.end_session(s.session_id)
    assert (await event_log.get_session(s.session_id)).state == "ended"


async def test_create_validation(event_log: EventLog) -> None:
    with pytest.raises(ValidationError):
        await event_log.create_session(session_id="bad id")
    with pytest.raises(ValidationError):
        await event_log.create_session(labels={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ValidationError):
        await event_log.create_session(idempotency_key="")
    with pytest.raises(ValidationError):
        await event_log.create_session(agent="a\x00b")
    for ttl in (-1, 1.5, "10"):
        with pytest.raises(ValidationError):
            await event_log.create_session(ttl_s=ttl)  # type: ignore[arg-type]


async def test_create_returns_what_get_reads_back(event_log: EventLog) -> None:
    for input in (None, {"q": "hi"}):
        made = await event_log.create_session("a", labels={"k": "v"}, input=input, ttl_s=30)
        got = await event_log.get_session(made.session_id)
        assert made == msgspec.structs.replace(got, updated_at=made.updated_at)
        again = await event_log.create_session("a", session_id=made.session_id)
        assert again == got  # an existing session: its stored state


async def test_a_hosts_end_releases_its_hosting_in_the_same_step(event_log: EventLog) -> None:
    from eventcore._append import HostingAck
    from eventcore.errors import StaleHost

    log = event_log
    s = await log.create_session("a")
    sk = log.keys.session(s.session_id)
    await log.redis.xgroup_create(sk.dispatch, "g", id="0")
    ((_, ((eid, _),)),) = await log.redis.xreadgroup("g", "w1", {sk.dispatch: ">"})
    await log.redis.hset(sk.meta, mapping={"host": "w1", "epoch": 3})
    await log.redis.set(sk.lease, "w1")
    with pytest.raises(StaleHost):  # a fenced host releases nothing
        await log.end_session(s.session_id, epoch=2, ack=HostingAck("g", eid.decode(), "w1"))
    assert (await log.redis.xpending(sk.dispatch, "g"))["pending"] == 1
    with pytest.raises(ValidationError):
        await log.end_session(s.session_id, ack=HostingAck("g", eid.decode(), "w1"))
    res = await log.end_session(s.session_id, epoch=3, ack=HostingAck("g", eid.decode(), "w1"))
    assert res.seq == 2 and not res.duplicate
    assert (await log.redis.xpending(sk.dispatch, "g"))["pending"] == 0
    assert await log.redis.exists(sk.lease) == 0
    meta = await log.redis.hgetall(sk.meta)
    assert meta[b"host"] == b"" and b"dispatched" not in meta and meta[b"state"] == b"ended"


async def test_a_hosts_end_leaves_another_hosts_lease_alone(event_log: EventLog) -> None:
    from eventcore._append import HostingAck

    log = event_log
    s = await log.create_session("a")
    sk = log.keys.session(s.session_id)
    await log.redis.set(sk.lease, "w2")
    await log.end_session(s.session_id, epoch=0, ack=HostingAck("g", "1-0", "w1"))
    assert await log.redis.get(sk.lease) == b"w2"


async def _feed_of(log: EventLog, sid: str) -> list[dict[bytes, bytes]]:
    feed = log.keys.session(sid).feed
    return [f for _, f in await log.redis.xrange(feed) if f[b"sid"] == sid.encode()]


async def test_an_id_created_again_is_a_new_incarnation(event_log: EventLog) -> None:
    log = event_log
    first = await log.create_session("a", session_id="again", input={"q": 1})
    assert len(first.incarnation) == 16 and first.incarnation.isdigit()
    assert (await log.get_session("again")).incarnation == first.incarnation
    same = await log.create_session("a", session_id="again")  # idempotent: the same one
    assert same.incarnation == first.incarnation
    assert await log.incarnations(["again", "never"]) == {"again": first.incarnation,
                                                         "never": None}
    assert await log.delete_session("again")
    second = await log.create_session("a", session_id="again")
    assert second.incarnation > first.incarnation  # they only grow
    assert second.last_seq == 1
    feed = await _feed_of(log, "again")
    # every feed entry names its incarnation; the deletion is on the feed too, after the end
    assert [(f[b"t"], f[b"seq"], f[b"inc"].decode()) for f in feed] == [
        (b"session.created", b"1", first.incarnation), (b"input", b"2", first.incarnation),
        (b"session.ended", b"3", first.incarnation),
        (b"session.deleted", b"4", first.incarnation),
        (b"session.created", b"1", second.incarnation)]
    assert msgspec.json.decode(feed[3][b"d"])["type"] == "session.deleted"


async def test_delete_takes_the_projected_view_with_the_keys(event_log: EventLog) -> None:
    s = await event_log.create_session()
    view = event_log.keys.view(s.session_id)
    await event_log.redis.hset(view, mapping={"seq": 1, "v": "{}"})  # as the projector would
    assert await event_log.delete_session(s.session_id)
    keys = event_log.keys.session(s.session_id)
    assert await event_log.redis.exists(*keys.per_session, view) == 0
