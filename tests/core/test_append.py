"""Append: seq, dedupe, fencing, refusals, batches, large payloads, NOSCRIPT."""

from __future__ import annotations

import itertools
import os
from typing import Any

import anyio
import pytest

from eventcore import (
    Envelope,
    EventLog,
    PayloadTooLarge,
    SessionEnded,
    SessionNotFound,
    StaleHost,
    ValidationError,
)
from eventcore._channels import Channels, Message
from eventcore._layout import META_HOST
from eventcore.testing.invariants import check_log, read_all


def env(sid: str, n: int = 0, *, key: str = "", type: str = "message") -> Envelope:
    return Envelope(type=type, session_id=sid, payload={"n": n}, event_key=key)


async def test_seq_is_gap_free_from_one(event_log: EventLog) -> None:
    s = await event_log.create_session()
    results = [await event_log.append(env(s.session_id, i)) for i in range(5)]
    assert [r.seq for r in results] == [2, 3, 4, 5, 6]
    assert not any(r.duplicate for r in results)
    log = await read_all(event_log, s.session_id)
    check_log(log)
    assert [e.payload for e in log[1:]] == [{"n": i} for i in range(5)]
    assert (await event_log.get_session(s.session_id)).last_seq == 6


async def test_duplicate_event_key_returns_first_seq(event_log: EventLog) -> None:
    s = await event_log.create_session()
    first = await event_log.append(env(s.session_id, 1, key="k1"))
    await event_log.append(env(s.session_id, 2))
    again = await event_log.append(env(s.session_id, 3, key="k1"))
    assert (first.seq, first.duplicate) == (2, False)
    assert (again.seq, again.duplicate) == (2, True)
    log = await read_all(event_log, s.session_id)
    assert [e.seq for e in log] == [1, 2, 3]
    assert log[1].payload == {"n": 1}  # the first envelope stands


async def test_duplicate_keys_inside_one_batch(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    res = await event_log.append_many(
        [env(sid, 1, key="a"), env(sid, 2, key="b"), env(sid, 3, key="a"), env(sid, 4)]
    )
    assert [(r.seq, r.duplicate) for r in res] == [(2, False), (3, False), (2, True), (4, False)]
    # and across concurrent group-committed appends
    results: list[int] = []

    async def one() -> None:
        results.append((await event_log.append(env(sid, 9, key="same"))).seq)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    assert set(results) == {5}
    check_log(await read_all(event_log, sid))


async def test_generated_keys_are_unique_and_returned(event_log: EventLog) -> None:
    s = await event_log.create_session()
    res = await event_log.append_many([env(s.session_id, i) for i in range(50)])
    keys = [r.event_key for r in res]
    assert len(set(keys)) == 50 and all(keys)
    log = await read_all(event_log, s.session_id)
    assert [e.event_key for e in log[1:]] == keys


async def test_unknown_session_and_ended_session(event_log: EventLog) -> None:
    with pytest.raises(SessionNotFound):
        await event_log.append(env("nope"))
    s = await event_log.create_session()
    await event_log.end_session(s.session_id)
    with pytest.raises(SessionEnded):
        await event_log.append(env(s.session_id))
    with pytest.raises(SessionEnded):
        await event_log.signal(s.session_id, "k", 1)


async def test_fencing_refuses_stale_epoch(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    ok = await event_log.append(env(sid), epoch=0)  # a fresh session is at epoch 0
    assert ok.seq == 2
    # a worker re-hosts the session: the epoch moves on (as the workers' claim script does)
    redis: Any = event_log.redis  # (redis-py's stubs mix sync and async return types)
    await redis.hincrby(event_log.keys.session(sid).meta, "epoch", 3)
    with pytest.raises(StaleHost) as info:
        await event_log.append(env(sid), epoch=0)
    assert (info.value.epoch, info.value.current) == (0, 3)
    assert (await event_log.append(env(sid), epoch=3)).seq == 3
    assert (await event_log.append(env(sid))).seq == 4  # unfenced appends are not refused
    assert await event_log.last_seq(sid) == 4


async def test_refusal_in_a_batch_does_not_stop_other_sessions(event_log: EventLog) -> None:
    a = (await event_log.create_session()).session_id
    ended = (await event_log.create_session()).session_id
    await event_log.end_session(ended)
    with pytest.raises(SessionEnded):
        await event_log.append_many([env(a, 1), env(ended, 2), env("missing-one", 3), env(a, 4)])
    assert [e.payload for e in await event_log.read(a)][1:] == [{"n": 1}, {"n": 4}]


async def test_large_payload_is_a_shared_blob(event_log: EventLog) -> None:
    s = await event_log.create_session()
    t = await event_log.create_session()
    big = {"text": "x" * (event_log.settings.inline_limit + 10)}
    await event_log.append(Envelope(type="message", session_id=s.session_id, payload=big))
    await event_log.append(Envelope(type="message", session_id=s.session_id, payload=big))
    await event_log.append(Envelope(type="message", session_id=t.session_id, payload=big))
    got = (await event_log.read(s.session_id))[1:]
    assert [e.payload for e in got] == [big, big]
    assert got[0].payload_ref is not None and got[0].payload_ref.startswith("sha256:")
    assert got[0].payload_ref == got[1].payload_ref
    # one blob for the content, whatever the number of events (and the stream holds no copy)
    blob_keys = [k async for k in event_log.redis.scan_iter(f"{event_log.keys.namespace}:*blob*")]
    if event_log.keys.shard_of(s.session_id) == event_log.keys.shard_of(t.session_id):
        assert len(blob_keys) == 1
    else:
        assert len(blob_keys) == 2  # stored once per shard (a blob lives in its shard's slot)
    raw = await event_log.redis.xrange(event_log.keys.session(s.session_id).stream)
    assert all(len(fields[b"d"]) < 1000 for _, fields in raw)
    assert (await event_log.read(t.session_id))[1].payload == big


async def test_payload_limits(redis_url: str) -> None:
    async with EventLog(redis_url=redis_url, namespace="tlimits", inline_limit=256,
                        max_payload=2048) as log:
        s = await log.create_session()
        with pytest.raises(PayloadTooLarge):
            await log.append(Envelope(type="m", session_id=s.session_id, payload="x" * 5000))
        with pytest.raises(PayloadTooLarge):
            await log.append(Envelope(type="m", session_id=s.session_id, payload=1,
                                      server_data="y" * 5000))
        assert await log.last_seq(s.session_id) == 1  # nothing was written


async def test_noscript_reload(event_log: EventLog) -> None:
    s = await event_log.create_session()
    await event_log.redis.script_flush()
    assert (await event_log.append(env(s.session_id))).seq == 2
    await event_log.redis.script_flush()
    res = await event_log.append_many([env(s.session_id, i) for i in range(3)])
    assert [r.seq for r in res] == [3, 4, 5]
    await event_log.redis.script_flush()
    assert await event_log.effect(s.session_id, "e", _one) == 1


async def _one() -> int:
    return 1


async def test_append_rejects_bad_envelopes(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    with pytest.raises(ValidationError):
        await event_log.append(Envelope(type="", session_id=sid))
    with pytest.raises(ValidationError):
        await event_log.append(Envelope(type="a\nb", session_id=sid))
    with pytest.raises(ValidationError):
        await event_log.append(Envelope(type="session.created", session_id=sid))
    with pytest.raises(ValidationError):
        await event_log.append(Envelope(type="signal", session_id=sid, payload={"no": "key"}))
    with pytest.raises(ValidationError):
        await event_log.append(Envelope(type="m", session_id=sid, payload=object()))
    with pytest.raises(ValidationError):
        await event_log.append(env(sid), epoch=-1)
    assert await event_log.last_seq(sid) == 1


async def test_user_payload_ref_cannot_point_at_blobs(event_log: EventLog) -> None:
    s = await event_log.create_session()
    await event_log.append(Envelope(type="m", session_id=s.session_id, payload=1,
                                    payload_ref="sha256:" + "0" * 64))
    got = (await event_log.read(s.session_id))[1]
    assert (got.payload, got.payload_ref) == (1, None)


async def test_signal_and_effect_envelopes_through_append(event_log: EventLog) -> None:
    s = await event_log.create_session()
    await event_log.append(Envelope(type="signal", session_id=s.session_id,
                                    payload={"key": "mood", "value": "ok"}))
    latest = await event_log.latest_signals(s.session_id)
    assert latest["mood"].payload == {"key": "mood", "value": "ok"}


def test_forked_child_generates_other_keys_and_tokens() -> None:
    from eventcore._append import _ids

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its prefix and leave at once
        os.write(w, _ids.prefix.encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert child.startswith("g") and child != _ids.prefix


async def test_every_append_notifies_but_only_outside_writes_wake_hosts(
    event_log: EventLog,
) -> None:
    """``notify`` hears every append; ``wake`` only those made without a host epoch while the
    session has a host (what a hosting worker must react to: it learns its own writes' seqs
    from their replies; one that claims the session later reads its stream in the claim's own
    step, so a session without a host wakes nobody)."""
    log = event_log
    s = await log.create_session()
    sk = log.keys.session(s.session_id)
    heard: dict[str, list[str]] = {sk.notify: [], sk.wake: []}
    # the one pub/sub listener: SUBSCRIBE on one node, SSUBSCRIBE per slot owner on a cluster
    async with Channels(log.redis, [sk.notify, sk.wake]) as listener:
        assert listener.connected  # both subscribed before anything is appended
        await log.append(Envelope(type="message", session_id=s.session_id), epoch=0)
        await log.append(Envelope(type="input", session_id=s.session_id, payload="no host"))
        redis: Any = log.redis  # (redis-py's stubs mix sync and async return types)
        await redis.hset(sk.meta, META_HOST, "w1")  # as a claim does
        await log.append(Envelope(type="input", session_id=s.session_id, payload="hi"))
        await log.append_many([Envelope(type="message", session_id=s.session_id)] * 2,
                              epoch=0)
        with anyio.fail_after(5):
            async for event in listener:
                if isinstance(event, Message):
                    heard[event.channel.decode()].append(event.data.decode())
                if len(heard[sk.notify]) >= 4:
                    break
    sid = s.session_id
    assert heard == {sk.notify: [f"{sid} 2", f"{sid} 3", f"{sid} 4", f"{sid} 6"],
                     sk.wake: [f"{sid} 4"]}


@pytest.mark.single_node  # (on a cluster the doorbell listens: tests/cluster)
async def test_a_dispatch_rings_no_channel_on_one_node(event_log: EventLog) -> None:
    """On one node the workers' dispatch read blocks on XREADGROUP: a creation (a dispatch
    entry) publishes nothing on the dispatch doorbell channel, nor wakes a host (it has
    none)."""
    log = event_log
    sid = "rings-nothing"
    sk = log.keys.session(sid)
    bell = log.keys.dispatched(sk.shard)
    heard: list[tuple[str, str]] = []
    async with Channels(log.redis, [bell, sk.wake]) as listener:
        assert listener.connected
        await log.create_session("agent", session_id=sid, input="go")
        assert await log.redis.xlen(sk.dispatch) == 1  # dispatched all the same
        await log.redis.publish(bell, "marker")  # (published after the script's step)
        with anyio.fail_after(5):
            async for event in listener:
                if isinstance(event, Message):
                    heard.append((event.channel.decode(), event.data.decode()))
                    if event.data == b"marker":
                        break
    assert heard == [(bell, "marker")]


def _on_shard_0(event_log: EventLog, prefix: str, n: int) -> list[str]:
    """``n`` session ids of shard 0 (so their events go in one script call)."""
    ids = (f"{prefix}-{i}" for i in itertools.count())
    return list(itertools.islice(
        (sid for sid in ids if event_log.appender.session_keys(sid).shard == 0), n))


async def test_plain_and_full_events_mixed_in_one_script_call(event_log: EventLog) -> None:
    """Plain events (generated key, no epoch, no extra) travel in the script's short form; one
    batch mixing them with keyed, fenced and side-effect events over two sessions of one shard
    keeps seq gap-free per session, dedupes, fences, refuses per event, and a resend of it is
    answered from its token."""
    ap = event_log.appender
    sids = _on_shard_0(event_log, "mixed", 2)
    for sid in sids:
        await event_log.create_session(session_id=sid)
    a, b = sids
    batch = [
        ap.prepare(env(a, 1)),
        ap.prepare(env(b, 2)),
        ap.prepare(env(a, 3, key="k")),
        ap.prepare(env(a, 4, key="k")),
        ap.prepare(env(b, 5), epoch=7),  # stale: the session's epoch is 0
        ap.prepare(env(b, 6), epoch=0),
        ap.prepare(env(a, 7, type="session.checkpoint")),
        ap.prepare(env(b, 8)),
        ap.prepare(env(a, 9)),
    ]
    _, args, _ = ap.script_call(batch, "layout")
    # the plain events (a checkpoint too) travel as records, the others as 6 args each
    assert args[10:13] == [2, "message", "session.checkpoint"]  # the plain events' types
    assert args[13].count(b"\n\0\0") == 4 and len(args) == 14 + 4 * 6
    first = await ap._send(batch, token="mixed")
    summary = [
        (r.session_id, r.seq, r.duplicate) if not isinstance(r, Exception) else type(r).__name__
        for r in first
    ]
    assert summary == [
        (a, 2, False), (b, 2, False), (a, 3, False), (a, 3, True), "StaleHost",
        (b, 3, False), (a, 4, False), (b, 4, False), (a, 5, False),
    ]
    again = await ap._send(batch, token="mixed")
    assert [(r.session_id, r.seq, r.duplicate) for r in again if not isinstance(r, Exception)
            ] == [s for s in summary if isinstance(s, tuple)]
    for sid, last in ((a, 5), (b, 4)):
        log = await read_all(event_log, sid)
        check_log(log)
        assert [e.seq for e in log] == list(range(1, last + 1))
    assert [e.payload for e in (await read_all(event_log, a))[1:]] == [
        {"n": 1}, {"n": 3}, {"n": 7}, {"n": 9}]
    assert (await event_log.get_session(a)).last_seq == 5


async def test_a_batch_past_the_records_byte_indexes_falls_back_to_full_events(
    event_log: EventLog,
) -> None:
    """A plain event's record carries its session and type index as one byte each: a batch of
    more than 255 sessions or types sends the rest as full events, and every event lands at its
    seq with its type (spaces and non-ASCII in types, payloads with newlines in strings)."""
    ap = event_log.appender
    sids = _on_shard_0(event_log, "wide", 300)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for sid in sids:
                tg.start_soon(lambda s: event_log.create_session(session_id=s), sid)
    batch = [
        ap.prepare(Envelope(type=f"custom é {n % 290}", session_id=sids[n % 300],
                            payload={"n": n, "text": "two\nlines"}))
        for n in range(600)
    ]
    _, args, _ = ap.script_call(batch, "wide")
    ntypes = args[8 + 300]
    assert ntypes > 255  # indexes numbered past one byte: their events went as full events
    assert args[9 + 300 + ntypes].count(b"\n\0\0") == (len(args) - 10 - 300 - ntypes) // 6 > 0
    results = await ap._send(batch, token="wide")
    assert [(r.session_id, r.seq) for r in results if not isinstance(r, Exception)] == [
        (sids[n % 300], 2 + n // 300) for n in range(600)]
    for n in (0, 299, 300, 599):
        log = await read_all(event_log, sids[n % 300])
        check_log(log)
        assert log[1 + n // 300].type == f"custom é {n % 290}"
        assert log[1 + n // 300].payload == {"n": n, "text": "two\nlines"}


async def test_non_ascii_envelopes_in_one_batch_round_trip(event_log: EventLog) -> None:
    """The script takes a batch's events as one msgpack array of strings: envelopes with
    non-ASCII payloads, event keys, server_data and signal keys (plain and full forms, one
    batch) are stored and read back exactly."""
    s = await event_log.create_session()
    sid = s.session_id
    text = "ünï—cødé 🎉 \u2028 \\ \" \x7f"
    envs = [
        Envelope(type="message", session_id=sid, payload={"t": text}),
        Envelope(type="message", session_id=sid, payload={"t": text}, event_key="ключ-🎉"),
        Envelope(type="message", session_id=sid, payload=text, server_data={"é": text}),
        Envelope(type="signal", session_id=sid, payload={"key": "sïg-🎉", "v": text}),
    ]
    got = await event_log.append_many(envs)
    assert [r.seq for r in got] == [2, 3, 4, 5]
    stored = (await event_log.read(sid))[1:]
    assert [(e.payload, e.event_key, e.server_data) for e in stored] == [
        ({"t": text}, got[0].event_key, None), ({"t": text}, "ключ-🎉", None),
        (text, got[2].event_key, {"é": text}),
        ({"key": "sïg-🎉", "v": text}, got[3].event_key, None)]
    again = await event_log.append(envs[1])  # the non-ASCII key dedupes
    assert (again.seq, again.duplicate) == (3, True)


async def test_creation_and_end_keys_answer_from_session_state(event_log: EventLog) -> None:
    """session.created and session.ended under their own keys (as create_session and
    end_session send them) dedupe by the session's state, not the dedupe map (a lookup and a
    write less per creation and per end); every other event under those keys is still a
    duplicate of that creation / end."""
    s = await event_log.create_session()
    sid = s.session_id
    keys = event_log.keys.session(sid)
    again = await event_log.create_session(session_id=sid)
    assert again.session_id == sid and again.incarnation == s.incarnation
    assert (await event_log.append(env(sid, 1, key="session.created"))).duplicate
    await event_log.append(env(sid, 2, key="k"))
    end = await event_log.end_session(sid)
    assert (end.seq, end.duplicate) == (3, False)
    for res in (await event_log.end_session(sid),
                await event_log.end_session(sid, "failed"),
                await event_log.append(env(sid, 3, key="session.ended"))):
        assert (res.seq, res.duplicate) == (3, True)
    with pytest.raises(SessionEnded):
        await event_log.append(env(sid, 4, key="other"))
    assert set(await event_log.redis.hkeys(keys.dedupe)) == {b"k"}
    log = await read_all(event_log, sid)
    check_log(log)
    assert [e.type for e in log] == ["session.created", "message", "session.ended"]
    # in one batch: the creation's repeat, an event under its key, the end and its repeat
    t = (await event_log.create_session()).session_id
    res = await event_log.append_many([
        env(t, 5, key="session.created"), env(t, 6),
        Envelope(type="session.ended", session_id=t, payload={"reason": "completed"},
                 event_key="session.ended"),
        Envelope(type="session.ended", session_id=t, payload={"reason": "failed"},
                 event_key="session.ended")])
    assert [(r.seq, r.duplicate) for r in res] == [(1, True), (2, False), (3, False), (3, True)]
    assert await event_log.redis.exists(event_log.keys.session(t).dedupe) == 0


async def test_one_notify_message_per_script_call(event_log: EventLog) -> None:
    """The notes of one append script call (one batch, one shard) go out as one message on the
    shard's notify channel, one ``"<sid> <last seq>"`` a line: one PUBLISH per call."""
    log = event_log
    a = (await log.create_session()).session_id
    shard = log.keys.shard_of(a)
    b = next(sid for sid in (f"n{i}" for i in range(10_000)) if log.keys.shard_of(sid) == shard
             and sid != a)
    await log.create_session(session_id=b)
    channel = log.keys.notify(shard)
    async with Channels(log.redis, [channel]) as listener:
        assert listener.connected
        await log.append_many([Envelope(type="message", session_id=a),
                               Envelope(type="message", session_id=b),
                               Envelope(type="message", session_id=a)])
        with anyio.fail_after(5):
            async for event in listener:
                if isinstance(event, Message):
                    assert event.data.decode() == f"{a} 3\n{b} 2"
                    break
