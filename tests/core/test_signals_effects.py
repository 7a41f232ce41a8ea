"""Signals (replay, latest, summaries) and effects (once, waiters, expiry, failures)."""

from __future__ import annotations

import hashlib
import uuid

import anyio
import msgspec
import pytest

from eventcore import (
    EffectFailed,
    EventLog,
    SessionEnded,
    SessionNotFound,
    StaleHost,
    ValidationError,
    client_json,
    decode_payload,
)
from eventcore._effects import CLAIM_LUA
from eventcore._envelope import SignalPayload

# -- signals -----------------------------------------------------------------------------------


async def test_replay_signals_since_with_keys(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    seqs = {}
    for i in range(30):
        key = ("status", "progress", "mood")[i % 3]
        seqs[i] = (await event_log.signal(sid, key, {"i": i})).seq
        await event_log.emit(sid, "message", i)  # interleaved non-signals
    everything = await event_log.replay_signals(sid, page=7)
    assert [e.payload["value"]["i"] for e in everything] == list(range(30))
    since = seqs[10]
    tail = await event_log.replay_signals(sid, since, keys=["status", "mood"], page=4)
    want = [i for i in range(11, 30) if i % 3 in (0, 2)]
    assert [e.payload["value"]["i"] for e in tail] == want
    assert all(e.seq > since for e in tail)
    assert [e.seq for e in tail] == sorted(e.seq for e in tail)
    assert [e.payload["key"] for e in await event_log.replay_signals(sid, 0, "mood")] == \
        ["mood"] * 10
    assert await event_log.replay_signals(sid, 10_000) == []


async def test_latest_signals_in_one_call(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    await event_log.signal(sid, "status", "thinking")
    await event_log.signal(sid, "progress", 0.5)
    await event_log.signal(sid, "status", "done")
    await event_log.signal(sid, "odd {key}/with:stuff", True)
    latest = await event_log.latest_signals(sid)
    assert {k: v.payload["value"] for k, v in latest.items()} == {
        "status": "done", "progress": 0.5, "odd {key}/with:stuff": True}
    assert latest["status"].seq == 4
    some = await event_log.latest_signals(sid, ["status", "missing"])
    assert list(some) == ["status"]
    assert await event_log.latest_signals(sid, []) == {}
    typed = decode_payload(latest["progress"])
    assert isinstance(typed, SignalPayload) and typed.value == 0.5


async def test_signal_summary_keeps_value_server_side(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    big = {"blob": "z" * 10_000}
    await event_log.signal(sid, "doc", big)  # over 4 KiB: summarized by default
    await event_log.signal(sid, "secret", "hunter2", summarize=True, content_type="text/plain")
    await event_log.signal(sid, "raw", b"\x00\x01binary", summarize=True,
                           content_type="application/octet-stream")
    doc, secret, raw = await event_log.replay_signals(sid)
    raw_json = msgspec.json.encode(big)
    assert doc.payload["summary"]["size"] == len(raw_json)
    assert doc.payload["summary"]["sha256"] == hashlib.sha256(raw_json).hexdigest()
    assert 0 < len(doc.payload["summary"]["sample"]) <= 256
    assert secret.payload["summary"]["sample"] == ""
    assert "value" not in doc.payload
    assert doc.server_data == {"value": big}
    assert secret.server_data == {"value": "hunter2"}
    assert secret.payload["summary"]["content_type"] == "text/plain"
    assert b"hunter2" not in client_json(secret)  # clients never see server_data
    assert raw.payload["summary"]["size"] == 8
    assert raw.server_data is not None  # bytes are kept (base64)
    latest = await event_log.latest_signals(sid)
    assert "summary" in latest["doc"].payload and latest["doc"].server_data is None


async def test_signal_validation(event_log: EventLog) -> None:
    s = await event_log.create_session()
    for bad in ("", "k\x00", "x" * 600, "\udc80", b"bytes", None):
        with pytest.raises(ValidationError):
            await event_log.signal(s.session_id, bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await event_log.signal(s.session_id, "k", object())
    assert await event_log.last_seq(s.session_id) == 1


# -- effects -----------------------------------------------------------------------------------


class Counter:
    def __init__(self, result: object = "ok", gate: anyio.Event | None = None) -> None:
        self.calls = 0
        self.result = result
        self.gate = gate
        self.started = anyio.Event()

    async def __call__(self) -> object:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.result


async def test_effect_runs_once(event_log: EventLog) -> None:
    s = await event_log.create_session()
    fn = Counter({"charge": 42})
    assert await event_log.effect(s.session_id, "charge", fn) == {"charge": 42}
    assert await event_log.effect(s.session_id, "charge", fn) == {"charge": 42}
    assert fn.calls == 1
    effects = await event_log.effects(s.session_id)
    assert effects["charge"].payload["status"] == "ok"
    recorded = [e for e in await event_log.read(s.session_id) if e.type == "effect"]
    assert len(recorded) == 1 and recorded[0].payload["result"] == {"charge": 42}
    # recorded results survive the session's end
    await event_log.end_session(s.session_id)
    assert await event_log.effect(s.session_id, "charge", fn) == {"charge": 42}
    with pytest.raises(SessionEnded):
        await event_log.effect(s.session_id, "new-one", fn)
    assert fn.calls == 1


async def test_concurrent_callers_wait_for_the_first(event_log: EventLog) -> None:
    s = await event_log.create_session()
    gate = anyio.Event()
    fn = Counter("once", gate)
    results: list[object] = []

    async def call() -> None:
        results.append(await event_log.effect(s.session_id, "k", fn))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(call)
        await fn.started.wait()  # the first one claimed and runs; the others must wait
        gate.set()
    assert results == ["once"] * 10
    assert fn.calls == 1


async def test_abandoned_claim_expires_and_is_retried(event_log: EventLog) -> None:
    s = await event_log.create_session()
    keys = event_log.keys.session(s.session_id)
    # a caller that claimed the key and then "crashed": it never records anything
    claim = event_log.redis.register_script(CLAIM_LUA)
    verdict, attempt = await claim(keys=[keys.effects, keys.meta],
                                   args=["pay", uuid.uuid4().hex, 300, ""])
    assert (verdict, attempt) == (b"run", 1)
    fn = Counter("paid")
    with anyio.fail_after(10):
        assert await event_log.effect(s.session_id, "pay", fn) == "paid"
    assert fn.calls == 1
    recorded = decode_payload((await event_log.effects(s.session_id))["pay"])
    assert (recorded.status, recorded.attempt) == ("ok", 1)


async def test_cancelled_caller_releases_its_claim(event_log: EventLog) -> None:
    s = await event_log.create_session()
    gate = anyio.Event()
    started = Counter("never", gate)
    with anyio.move_on_after(0.2):
        await event_log.effect(s.session_id, "k", started, claim_ttl_s=60)
    fn = Counter("second")
    with anyio.fail_after(5):  # far less than the 60 s claim
        assert await event_log.effect(s.session_id, "k", fn) == "second"


class Flaky(Exception):
    retryable = True


class Fatal(Exception):
    retryable = False


async def test_failures_are_recorded(event_log: EventLog) -> None:
    s = await event_log.create_session()
    sid = s.session_id
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Flaky("try again")
        return "worked"

    with pytest.raises(EffectFailed) as info:
        await event_log.effect(sid, "flaky", flaky)
    assert info.value.retryable and info.value.error_type == "Flaky"
    assert await event_log.effect(sid, "flaky", flaky) == "worked"  # retryable: runs again
    assert await event_log.effect(sid, "flaky", flaky) == "worked"
    assert calls == 2
    rec = decode_payload((await event_log.effects(sid))["flaky"])
    assert (rec.status, rec.attempt) == ("ok", 2)

    fatal_calls = 0

    async def fatal() -> None:
        nonlocal fatal_calls
        fatal_calls += 1
        raise Fatal("no")

    for _ in range(3):
        with pytest.raises(EffectFailed) as info:
            await event_log.effect(sid, "fatal", fatal)
        assert not info.value.retryable and info.value.error_type == "Fatal"
    assert fatal_calls == 1  # terminal: never run again
    effects = [e.payload for e in await event_log.read(sid) if e.type == "effect"]
    assert [(p["key"], p["status"]) for p in effects] == [
        ("flaky", "failed"), ("flaky", "ok"), ("fatal", "failed")]


async def test_unrecordable_result_is_a_terminal_failure(event_log: EventLog) -> None:
    s = await event_log.create_session()
    fn = Counter(object())
    for _ in range(2):
        with pytest.raises(EffectFailed) as info:
            await event_log.effect(s.session_id, "weird", fn)
        assert info.value.error_type == "ValidationError"
    assert fn.calls == 1


async def test_effect_fencing_and_missing(event_log: EventLog) -> None:
    with pytest.raises(SessionNotFound):
        await event_log.effect("no-such-session", "k", Counter())
    s = await event_log.create_session()
    await event_log.redis.hset(event_log.keys.session(s.session_id).meta, "epoch", 2)
    fn = Counter()
    with pytest.raises(StaleHost):
        await event_log.effect(s.session_id, "k", fn, epoch=1)
    assert fn.calls == 0
    assert await event_log.effect(s.session_id, "k", fn, epoch=2) == "ok"
    for bad in ("", "k\x00", "y" * 600):
        with pytest.raises(ValidationError):
            await event_log.effect(s.session_id, bad, fn)


async def test_large_effect_result_is_hydrated(event_log: EventLog) -> None:
    s = await event_log.create_session()
    big = "r" * (event_log.settings.inline_limit + 1)
    fn = Counter(big)
    assert await event_log.effect(s.session_id, "big", fn) == big
    assert await event_log.effect(s.session_id, "big", fn) == big
    assert fn.calls == 1


async def test_claim_is_reentrant_for_its_token(event_log: EventLog) -> None:
    """redis-py resends the claim when its reply was lost: the resend must not wait for the
    claim the first send made."""
    s = await event_log.create_session()
    keys = event_log.keys.session(s.session_id)
    claim = event_log.redis.register_script(CLAIM_LUA)
    args = ["k", "token-1", 30_000, ""]
    assert await claim(keys=[keys.effects, keys.meta], args=args) == [b"run", 1]
    assert await claim(keys=[keys.effects, keys.meta], args=args) == [b"run", 1]
    other = await claim(keys=[keys.effects, keys.meta], args=["k", "token-2", 30_000, ""])
    assert other[0] == b"wait"


async def test_a_claim_of_a_superseded_host_epoch_does_not_hold(event_log: EventLog) -> None:
    """The session was re-hosted (epoch 1 -> 2) while its old host held a live claim: that host
    is fenced (what it would record is refused), so the new host runs the effect at once; a
    caller of the claim's own epoch, or of none, still waits for it."""
    from eventcore import _layout

    s = await event_log.create_session()
    keys = event_log.keys.session(s.session_id)
    claim = event_log.redis.register_script(CLAIM_LUA)
    await event_log.redis.hset(keys.meta, _layout.META_EPOCH, 1)
    ks = [keys.effects, keys.meta]
    assert await claim(keys=ks, args=["k", "old-host", 30_000, 1]) == [b"run", 1]
    assert (await claim(keys=ks, args=["k", "same-epoch", 30_000, 1]))[0] == b"wait"
    assert (await claim(keys=ks, args=["k", "no-epoch", 30_000, ""]))[0] == b"wait"
    await event_log.redis.hset(keys.meta, _layout.META_EPOCH, 2)  # re-hosted
    assert await claim(keys=ks, args=["k", "new-host", 30_000, 2]) == [b"run", 1]
    # the superseded host never takes it back (it waits on the new claim, or is refused)
    assert (await claim(keys=ks, args=["k", "old-host-2", 30_000, 1]))[0] in (b"wait", b"stale")
    assert (await claim(keys=ks, args=["k", "no-epoch", 30_000, ""]))[0] == b"wait"
