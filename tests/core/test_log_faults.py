"""Faults: Redis restarts and dropped connections under load, Redis gone past the retry budget,
malformed entries, wrong-typed keys, hostile ids and keys."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import anyio
import pytest
import redis.asyncio as aioredis

from eventcore import (
    CorruptEntry,
    Envelope,
    EventLog,
    RedisUnavailable,
    SessionNotFound,
    ValidationError,
    load_settings,
)
from eventcore.testing._server import RedisServer
from eventcore.testing.invariants import assert_acknowledged_present, check_log, read_all

pytestmark = pytest.mark.redis_restart


class Burst:
    """Concurrent producers appending to a few sessions; records every acknowledged append."""

    def __init__(self, log: EventLog, sessions: list[str], producers: int, per: int) -> None:
        self.log = log
        self.sessions = sessions
        self.producers = producers
        self.per = per
        self.acked: dict[str, dict[str, int]] = {s: {} for s in sessions}
        self.order: dict[int, list[tuple[str, int]]] = {}
        self.count = 0
        self.milestones: dict[int, anyio.Event] = {}

    def at(self, count: int) -> anyio.Event:
        return self.milestones.setdefault(count, anyio.Event())

    async def producer(self, p: int) -> None:
        mine = self.order.setdefault(p, [])
        for i in range(self.per):
            sid = self.sessions[(p + i) % len(self.sessions)]
            # half the producers choose their event keys, half let the log generate them
            key = f"p{p}-{i}" if p % 2 else ""
            if i % 7 == 3:
                res = (await self.log.append_many([
                    Envelope(type="m", session_id=sid, payload=[p, i, j],
                             event_key=f"{key}.{j}" if key else "")
                    for j in range(3)
                ]))
            else:
                res = [await self.log.append(Envelope(type="m", session_id=sid, payload=[p, i],
                                                      event_key=key))]
            for r in res:
                assert not r.duplicate
                self.acked[sid][r.event_key] = r.seq
                mine.append((sid, r.seq))
                self.count += 1
                for n, ev in self.milestones.items():
                    if self.count >= n:
                        ev.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for p in range(self.producers):
                tg.start_soon(self.producer, p)

    async def check(self) -> None:
        total = 0
        for sid, acked in self.acked.items():
            log = await read_all(self.log, sid)
            check_log(log)  # strictly increasing, gap-free from 1, each event key once
            assert_acknowledged_present(log, acked)
            assert len(log) == len(acked) + 1  # nothing but the creation and what was acked
            total += len(acked)
        assert total == self.count
        for seqs in self.order.values():  # each producer's appends landed in its order
            for sid in self.sessions:
                mine = [seq for s, seq in seqs if s == sid]
                assert mine == sorted(mine)
        # retrying acknowledged appends (same keys) never makes a second event
        for sid, acked in self.acked.items():
            keys = [k for k in acked if k.startswith("p")][:20]
            again = await self.log.append_many(
                [Envelope(type="m", session_id=sid, payload="retry", event_key=k) for k in keys]
            )
            assert [(r.seq, r.duplicate) for r in again] == [(acked[k], True) for k in keys]


async def _log_on(server: RedisServer, **kw: object) -> EventLog:
    settings = load_settings(redis_url=server.url, namespace="f", shards=4, **kw)
    log = EventLog(settings)
    await log.start()
    return log


@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "sigkill"])
async def test_restart_during_burst(
    redis_server_factory: Callable[..., RedisServer], hard: bool
) -> None:
    server = redis_server_factory(appendfsync="always")
    log = await _log_on(server, retry_budget_s=20)
    try:
        sessions = [(await log.create_session()).session_id for _ in range(3)]
        burst = Burst(log, sessions, producers=24, per=40)

        at_restart = 0

        async def restart_midway() -> None:
            nonlocal at_restart
            await burst.at(200).wait()
            at_restart = burst.count
            await anyio.to_thread.run_sync(lambda: server.restart(hard=hard))

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(restart_midway)
                await burst.run()
        assert 200 <= at_restart < burst.count  # the restart hit the burst in its middle
        await burst.check()
    finally:
        await log.aclose()


async def test_client_kill_mid_burst(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()
    log = await _log_on(server, retry_budget_s=20)
    admin = aioredis.Redis.from_url(server.url)
    try:
        sessions = [(await log.create_session()).session_id for _ in range(3)]
        burst = Burst(log, sessions, producers=24, per=40)
        kills = 0

        async def killer() -> None:
            nonlocal kills
            for n in (100, 250, 400, 550, 700):
                await burst.at(n).wait()
                # every connection of the log, pooled and the appender's own, dropped at once
                kills += await admin.client_kill_filter(_type="normal", skipme=True)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                await burst.run()
        assert kills >= 5
        await burst.check()
    finally:
        await admin.aclose()
        await log.aclose()


async def test_resent_batch_is_answered_from_its_token(event_log: EventLog) -> None:
    """What redis-py does when a reply is lost: send the very same batch again."""
    s = await event_log.create_session()
    ap = event_log.appender
    batch = [ap.prepare(Envelope(type="m", session_id=s.session_id, payload=i)) for i in range(5)]
    first = await ap._send(batch, token="lost-reply")
    second = await ap._send(batch, token="lost-reply")
    assert first == second and [r.seq for r in first] == [2, 3, 4, 5, 6]
    # the answer is kept for about twice the retry budget (10 s here), not forever
    token = event_log.keys.batch(event_log.keys.shard_of(s.session_id), "lost-reply")
    assert 0 < await event_log.redis.ttl(token) <= 30
    check_log(await read_all(event_log, s.session_id))
    assert await event_log.last_seq(s.session_id) == 6


async def test_redis_down_past_the_budget(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    log = await _log_on(server, retry_budget_s=0.5)
    try:
        s = await log.create_session()
        server.kill()
        with anyio.fail_after(20):
            with pytest.raises(RedisUnavailable):
                await log.emit(s.session_id, "m", 1)
            with pytest.raises(RedisUnavailable):
                await log.append_many([Envelope(type="m", session_id=s.session_id)])
            with pytest.raises(RedisUnavailable):
                await log.read(s.session_id)
            with pytest.raises(RedisUnavailable):
                await log.create_session()
            with pytest.raises(RedisUnavailable):
                await log.signal(s.session_id, "k", 1)
        server.start()  # and it recovers once Redis is back
        assert (await log.emit(s.session_id, "m", 2)).seq == 2
    finally:
        await log.aclose()


def _same_shard(log: EventLog, sid: str) -> str:
    shard = log.keys.shard_of(sid)
    return next(c for i in itertools.count() if log.keys.shard_of(c := f"peer-{i}") == shard)


async def test_malformed_stream_entries(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    peer = (await event_log.create_session(session_id=_same_shard(event_log, sid))).session_id
    stream = event_log.keys.session(sid).stream
    await event_log.redis.xadd(stream, {"junk": "yes"}, id="0-2")  # no envelope field
    with pytest.raises(CorruptEntry, match="no envelope field"):
        await event_log.read(sid)
    with pytest.raises(CorruptEntry):
        await anext(aiter(event_log.tail(sid)))
    # the next append finds its seq taken: a typed error for that session only, and the other
    # session in the same batch (same shard, same script call) is appended
    with pytest.raises(CorruptEntry):
        await event_log.append_many([Envelope(type="m", session_id=sid),
                                     Envelope(type="m", session_id=peer, payload="ok")])
    assert [e.payload for e in await event_log.read(peer)][1:] == ["ok"]
    # an entry whose 'd' is not JSON
    t = (await event_log.create_session()).session_id
    await event_log.redis.xadd(event_log.keys.session(t).stream, {"t": "m", "d": "{nope"},
                               id="0-2")
    with pytest.raises(CorruptEntry, match="not a valid envelope"):
        await event_log.read(t)
    assert [e.seq for e in await event_log.read(t, 2)] == []  # after it, nothing is wrong
    # an entry id that is not a seq (someone XADDed with '*')
    u = (await event_log.create_session()).session_id
    await event_log.redis.xadd(event_log.keys.session(u).stream,
                               {"t": "m", "d": f'{{"type":"m","session_id":"{u}"}}'})
    with pytest.raises(CorruptEntry, match="not a seq id"):
        await event_log.read(u)


async def test_missing_blob_is_a_typed_error(event_log: EventLog) -> None:
    s = (await event_log.create_session()).session_id
    big = "b" * (event_log.settings.inline_limit + 1)
    await event_log.emit(s, "m", big)
    ref = (await event_log.read(s))[1].payload_ref
    assert ref is not None
    blob = event_log.keys.blob(event_log.keys.shard_of(s), ref.removeprefix("sha256:"))
    assert await event_log.redis.delete(blob) == 1
    with pytest.raises(CorruptEntry, match="blob missing"):
        await event_log.read(s)
    assert [e.seq for e in await event_log.read(s, 2)] == []


async def test_wrong_typed_keys(event_log: EventLog) -> None:
    r = event_log.redis
    a = (await event_log.create_session()).session_id
    peer = (await event_log.create_session(session_id=_same_shard(event_log, a))).session_id
    ka = event_log.keys.session(a)

    async def batch_fails_only_for_a(**kw: object) -> None:
        with pytest.raises(CorruptEntry):
            await event_log.append_many([
                Envelope(type="m", session_id=a, **kw),  # type: ignore[arg-type]
                Envelope(type="m", session_id=peer, payload="fine"),
            ])
        assert (await event_log.read(peer))[-1].payload == "fine"

    # the dedupe map
    await r.set(ka.dedupe, "junk")
    await batch_fails_only_for_a(event_key="chosen")
    await r.delete(ka.dedupe)
    # the signals and effects hashes
    await r.set(ka.signals, "junk")
    with pytest.raises(CorruptEntry):
        await event_log.signal(a, "k", 1)
    with pytest.raises(CorruptEntry):
        await event_log.latest_signals(a)
    await r.delete(ka.signals)
    await r.set(ka.effects, "junk")
    with pytest.raises(CorruptEntry):
        await event_log.effect(a, "k", _noop)
    with pytest.raises(CorruptEntry):
        await event_log.effects(a)
    await r.delete(ka.effects)
    # the stream
    await r.rename(ka.stream, ka.stream + ".bak")
    await r.set(ka.stream, "junk")
    await batch_fails_only_for_a()
    with pytest.raises(CorruptEntry):
        await event_log.read(a)
    await r.delete(ka.stream)
    await r.rename(ka.stream + ".bak", ka.stream)
    # the metadata
    await r.rename(ka.meta, ka.meta + ".bak")
    await r.set(ka.meta, "junk")
    await batch_fails_only_for_a()
    with pytest.raises(CorruptEntry):
        await event_log.get_session(a)
    await r.delete(ka.meta)
    await r.rename(ka.meta + ".bak", ka.meta)
    await r.hset(ka.meta, "seq", "not-a-number")
    await batch_fails_only_for_a()
    with pytest.raises(CorruptEntry):
        await event_log.get_session(a)
    await r.hset(ka.meta, "seq", 1)
    # everything repaired: the session works again, its log intact
    assert (await event_log.emit(a, "m", "back")).seq == 2
    check_log(await read_all(event_log, a))
    # a shard stream of the wrong type fails the whole shard's batch, with a typed error
    await r.rename(ka.feed, ka.feed + ".bak")
    await r.set(ka.feed, "junk")
    with pytest.raises(CorruptEntry, match="WRONGTYPE"):
        await event_log.emit(a, "m")
    await r.delete(ka.feed)
    await r.rename(ka.feed + ".bak", ka.feed)
    assert (await event_log.emit(a, "m", "again")).seq == 3


async def _noop() -> None:
    return None


BAD_SESSION_IDS = [
    "", "x" * 129, "{0}", "a{b}c", "a/b", "../etc", "a\x00b", "\udc80", "ünïcode", " lead",
    "a b", "tab\t", "new\nline", b"bytes", 42, None,
]


@pytest.mark.parametrize("bad", BAD_SESSION_IDS, ids=repr)
async def test_hostile_session_ids_are_rejected(event_log: EventLog, bad: object) -> None:
    calls = [
        lambda: event_log.create_session(session_id=bad),  # type: ignore[arg-type]
        lambda: event_log.append(Envelope(type="m", session_id=bad)),  # type: ignore[arg-type]
        lambda: event_log.append_many([Envelope(type="m", session_id=bad)]),  # type: ignore[arg-type]
        lambda: event_log.emit(bad, "m"),  # type: ignore[arg-type]
        lambda: event_log.get_session(bad),  # type: ignore[arg-type]
        lambda: event_log.end_session(bad),  # type: ignore[arg-type]
        lambda: event_log.delete_session(bad),  # type: ignore[arg-type]
        lambda: event_log.signal(bad, "k", 1),  # type: ignore[arg-type]
        lambda: event_log.replay_signals(bad),  # type: ignore[arg-type]
        lambda: event_log.latest_signals(bad),  # type: ignore[arg-type]
        lambda: event_log.effect(bad, "k", _noop),  # type: ignore[arg-type]
        lambda: event_log.effects(bad),  # type: ignore[arg-type]
    ]
    if bad is None:
        calls.pop(0)  # create_session(session_id=None) means "make one up"
    for call in calls:
        with pytest.raises(ValidationError):
            await call()
    # nothing but the deployment's shard count, written at start
    assert [k async for k in event_log.redis.scan_iter(f"{event_log.keys.namespace}:*")] == [
        event_log.keys.shard_count().encode()]


BAD_KEYS = ["x" * 513, "é" * 257, "nul\x00", "\udc80", "\ud800x", b"bytes", 7, None]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda v: repr(v)[:20])
async def test_hostile_keys_are_rejected(event_log: EventLog, bad: object) -> None:
    s = (await event_log.create_session()).session_id
    with pytest.raises(ValidationError):
        await event_log.append(Envelope(type="m", session_id=s, event_key=bad))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await event_log.signal(s, bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await event_log.effect(s, bad, _noop)  # type: ignore[arg-type]
    if bad is not None:  # None means "no idempotency key"
        with pytest.raises(ValidationError):
            await event_log.create_session(idempotency_key=bad)  # type: ignore[arg-type]
    # a batch with one bad envelope writes nothing at all
    with pytest.raises(ValidationError):
        await event_log.append_many([Envelope(type="m", session_id=s, event_key="fine"),
                                     Envelope(type="m", session_id=s, event_key=bad)])  # type: ignore[arg-type]
    assert await event_log.last_seq(s) == 1


ODD_KEYS = ["{0}", "{a}:b/c", "../../x", "sp ace", "ünï—cødé 🎉", "k" * 512, "é" * 256,
            '"quoted"\\', "\x01\x1f", "line\nbreak"]


async def test_odd_but_valid_keys_are_stored_safely(event_log: EventLog) -> None:
    s = (await event_log.create_session()).session_id
    for key in ODD_KEYS:
        first = await event_log.emit(s, "m", key, event_key=key)
        again = await event_log.emit(s, "m", "dup", event_key=key)
        assert again.duplicate and again.seq == first.seq
        await event_log.signal(s, key, key)
        assert await event_log.effect(s, key, _noop) is None
    latest = await event_log.latest_signals(s)
    assert {k: v.payload["value"] for k, v in latest.items()} == {k: k for k in ODD_KEYS}
    assert set(await event_log.effects(s)) == set(ODD_KEYS)
    log = await read_all(event_log, s)
    check_log(log)
    assert [e.event_key for e in log if e.type == "m"] == ODD_KEYS
    # nothing escaped the namespace or the session's shard tag
    names = [k async for k in event_log.redis.scan_iter("*")]
    ours = [n for n in names if n.startswith(f"{event_log.keys.namespace}:".encode())]
    shard = event_log.keys.shard_of(s)
    assert all(f"{{{shard}}}".encode() in n for n in ours if s.encode() in n)
    with pytest.raises(SessionNotFound):
        await event_log.emit("valid-but-missing", "m")
