"""Model-based test of the log under concurrency and faults (hypothesis stateful).

Each step runs concurrent producers (single appends, batches, retries of earlier envelopes with
their keys, signals, reads from random cursors) against a few sessions while a follower tails one
session from a random cursor, optionally with a fault injected mid-step: every connection of the
client dropped (``CLIENT KILL``) or the Redis server restarted (gracefully, or SIGKILL with
``appendfsync always``). After every step the log must be exactly what was acknowledged: in
order, gap-free, each event once, and every reader (reads, the follower) must have seen exactly
that log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from eventcore import Envelope, EventLog, SessionEnded, load_settings
from eventcore.testing._server import RedisServer
from eventcore.testing.invariants import (
    assert_acknowledged_present,
    assert_latest_signals,
    assert_same_events,
    assert_tail_exact,
    check_log,
    read_all,
)
from eventcore.testing.strategies import (
    Append,
    AppendBatch,
    Effect,
    Operation,
    Read,
    Retry,
    Signal,
    operations,
)

SESSIONS = ("s0", "s1", "s2")
FAULTS = st.sampled_from([None, None, "kill", "restart", "sigkill"])
STEP_TIMEOUT = 90


class Step:
    """One step's concurrent work and what each producer was told."""

    def __init__(
        self, log: EventLog, model: dict[str, list[Envelope]], runs: dict[tuple[str, str], int]
    ) -> None:
        self.log = log
        self.runs = runs  # (session, effect key) -> how many times its function ran, ever
        self.effects: dict[tuple[str, str], list[object]] = {}  # what each call returned
        self.before = {sid: list(envs) for sid, envs in model.items()}
        self.acked: list[tuple[Envelope, int, bool]] = []  # (what was sent, seq, duplicate)
        self.reads: list[tuple[str, int, list[Envelope]]] = []
        self.order: list[list[tuple[str, int]]] = []
        self.count = 0
        self.reached = anyio.Event()
        self.trigger = 1

    def _ack(self, env: Envelope, seq: int, dup: bool, mine: list[tuple[str, int]]) -> None:
        self.acked.append((env, seq, dup))
        if not dup:  # a duplicate answers with the earlier seq, by design
            mine.append((env.session_id, seq))
        self.count += 1
        if self.count >= self.trigger:
            self.reached.set()

    async def produce(self, sid: str, ops: list[Operation]) -> None:
        mine: list[tuple[str, int]] = []
        self.order.append(mine)
        history: list[Envelope] = []
        for op in ops:
            if isinstance(op, Append):
                env = op.envelope
                r = await self.log.append(env)
                history.append(_keyed(env, r.event_key))
                self._ack(env, r.seq, r.duplicate, mine)
            elif isinstance(op, AppendBatch):
                res = await self.log.append_many(list(op.envelopes))
                for env, r in zip(op.envelopes, res, strict=True):
                    history.append(_keyed(env, r.event_key))
                    self._ack(env, r.seq, r.duplicate, mine)
            elif isinstance(op, Retry) and history:
                earlier = history[op.index % len(history)]
                if earlier.event_key.startswith("u:"):  # keys the caller chose dedupe
                    again = msgspec.structs.replace(earlier, event_key=earlier.event_key[2:])
                    r = await self.log.append(again)
                    assert r.duplicate, f"retry of {again.event_key!r} made a new event"
                    self._ack(again, r.seq, True, mine)
            elif isinstance(op, Signal):
                r = await self.log.signal(sid, op.key, op.value)
                self._ack(Envelope(type="signal", session_id=sid, event_key=r.event_key,
                                   payload={"key": op.key, "value": op.value}), r.seq, False,
                          mine)
            elif isinstance(op, Read):
                self.reads.append((sid, op.after, await self.log.read(sid, op.after, op.limit)))
            elif isinstance(op, Effect):
                slot = (sid, op.key)

                async def fn(slot: tuple[str, str] = slot) -> str:
                    self.runs[slot] = self.runs.get(slot, 0) + 1
                    return f"{slot[1]} ran {self.runs[slot]}"

                self.effects.setdefault(slot, []).append(await self.log.effect(sid, op.key, fn))


def _keyed(env: Envelope, key: str) -> Envelope:
    # remember whether the caller chose the key ("u:") or the log generated it
    return msgspec.structs.replace(env, event_key=("u:" + env.event_key) if env.event_key else key)


class LogMachine(RuleBasedStateMachine):
    server: RedisServer
    counter = 0

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal()
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        LogMachine.counter += 1
        self.namespace = f"sm{LogMachine.counter}"
        # the log is entered and left in one task of the portal (its group commit's task group)
        self._log_cm = self.portal.wrap_async_context_manager(EventLog(load_settings(
            redis_url=self.server.url, namespace=self.namespace, shards=2, retry_budget_s=30,
            max_batch=16)))
        self.log: EventLog = self._log_cm.__enter__()
        self.model: dict[str, list[Envelope]] = {}
        self.ended: set[str] = set()
        self.faults = 0
        self.runs: dict[tuple[str, str], int] = {}
        self.effect_results: dict[tuple[str, str], object] = {}

    def teardown(self) -> None:
        if os.environ.get("EVENTCORE_SM_STATS"):
            sizes = {sid: len(m) for sid, m in self.model.items()}
            print(f"example: faults={self.faults} ended={sorted(self.ended)} sizes={sizes}")
        try:
            self._log_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def guarded() -> Any:
            with anyio.fail_after(STEP_TIMEOUT):
                return await fn(*args)

        return self.portal.call(guarded)

    @initialize()
    def create_sessions(self) -> None:
        async def create() -> None:
            for sid in SESSIONS:
                await self.log.create_session(session_id=sid)
                self.model[sid] = await read_all(self.log, sid)

        self.run(create)

    # -- rules -----------------------------------------------------------------------------------
    @precondition(lambda self: len(self.ended) < len(SESSIONS))
    @rule(
        data=st.data(),
        producers=st.integers(1, 6),
        fault=FAULTS,
        trigger=st.integers(1, 30),
        follow=st.sampled_from(SESSIONS),
        cursor=st.integers(0, 200),
    )
    def concurrent_step(
        self, data: st.DataObject, producers: int, fault: str | None, trigger: int, follow: str,
        cursor: int,
    ) -> None:
        live = [s for s in SESSIONS if s not in self.ended]
        plans = [
            (sid, data.draw(operations(sid, max_size=12), label=f"producer {p} on {sid}"))
            for p in range(producers)
            for sid in [data.draw(st.sampled_from(live), label=f"producer {p}")]
        ]
        after = min(cursor, len(self.model[follow]))
        step = Step(self.log, self.model, self.runs)
        step.trigger = trigger
        seen: list[Envelope] = []
        target: list[int] = []
        caught_up = anyio.Event()

        async def follower(task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            async for env in self.log.tail(follow, after, batch=5, block_ms=100):
                seen.append(env)
                if target and env.seq >= target[0]:
                    caught_up.set()

        async def inject() -> None:
            await step.reached.wait()
            if fault == "kill":
                admin = aioredis.Redis.from_url(self.server.url)
                try:
                    await admin.client_kill_filter(_type="normal", skipme=True)
                finally:
                    await admin.aclose()
            elif fault in ("restart", "sigkill"):
                await anyio.to_thread.run_sync(lambda: self.server.restart(hard=fault == "sigkill"))
            self.faults += 1

        async def go() -> None:
            async with anyio.create_task_group() as outer:
                await outer.start(follower)
                async with anyio.create_task_group() as tg:
                    if fault is not None:
                        tg.start_soon(inject)
                    for sid, ops in plans:
                        tg.start_soon(step.produce, sid, ops)
                    if fault is not None and step.count == 0:
                        step.reached.set()  # nothing to wait for: inject anyway
                # the follower must reach the end of the log as it now stands
                target.append(await self.log.last_seq(follow))
                if (seen[-1].seq if seen else after) >= target[0]:
                    caught_up.set()
                with anyio.fail_after(20):
                    await caught_up.wait()
                outer.cancel_scope.cancel()

        if fault is not None and not any(ops for _, ops in plans):
            step.reached.set()
        self.run(go)
        self.check_step(step)
        after_log = self.model[follow]
        assert_tail_exact(seen, after_log, after)

    def check_step(self, step: Step) -> None:
        new = {sid: self.run(read_all, self.log, sid) for sid in SESSIONS}
        for sid, log in new.items():
            check_log(log)  # strictly increasing, gap-free from 1, each event key once
            before = step.before[sid]
            assert_same_events(log[: len(before)], before)  # history never changes
        by_seq = {sid: {e.seq: e for e in log} for sid, log in new.items()}
        acked_keys: dict[str, dict[str, int]] = {sid: {} for sid in SESSIONS}
        for sent, seq, dup in step.acked:
            sid = sent.session_id
            stored = by_seq[sid].get(seq)
            assert stored is not None, f"acknowledged seq {seq} of {sid} is missing"
            if sent.event_key:
                assert stored.event_key == sent.event_key
                prior = acked_keys[sid].setdefault(sent.event_key, seq)
                assert prior == seq, f"key {sent.event_key!r} acked at {prior} and {seq}"
            if not dup and not sent.event_key:
                # a fresh event with a generated key: stored exactly as sent
                assert stored.type == sent.type and stored.payload == _norm(sent.payload)
        for sid, log in new.items():
            assert_acknowledged_present(log, acked_keys[sid])
            # nothing was stored that no producer was acknowledged for
            acked_seqs = {seq for sent, seq, _ in step.acked if sent.session_id == sid}
            for env in log[len(step.before[sid]):]:
                if env.type != "effect":  # effect records are checked below
                    assert env.seq in acked_seqs, f"{sid} seq {env.seq} was never acknowledged"
            # each effect: recorded once, its function run once (faults included: the claim and
            # the record survive dropped connections and restarts), every caller told the same
            records: dict[str, list[Envelope]] = {}
            for env in log:
                if env.type == "effect":
                    records.setdefault(env.payload["key"], []).append(env)
            for key, recs in records.items():
                assert len(recs) == 1, f"effect {key!r} of {sid} recorded {len(recs)} times"
                assert self.runs[(sid, key)] == 1, f"effect {key!r} of {sid} ran again"
                result = recs[0].payload["result"]
                assert self.effect_results.setdefault((sid, key), result) == result
        for (sid, key), results in step.effects.items():
            assert set(results) == {self.effect_results[(sid, key)]}, (sid, key, results)
        for seqs in step.order:  # a producer's appends land in the order it made them
            for sid in SESSIONS:
                mine = [seq for s, seq in seqs if s == sid]
                assert mine == sorted(mine), f"producer order broken in {sid}: {mine}"
        for sid, after, got in step.reads:  # every read saw a gap-free slice of the final log
            assert [e.seq for e in got] == list(range(after + 1, after + 1 + len(got)))
            assert_same_events(got, [by_seq[sid][e.seq] for e in got])
        self.model = new

    @rule(sid=st.sampled_from(SESSIONS), after=st.integers(0, 300), limit=st.integers(1, 50))
    def read_from_cursor(self, sid: str, after: int, limit: int) -> None:
        got = self.run(self.log.read, sid, after, limit)
        assert_same_events(got, self.model[sid][after : after + limit])

    # ending is final: allow it once per run, and only once the log has some history
    @precondition(lambda self: not self.ended and sum(map(len, self.model.values())) > 20)
    @rule(data=st.data(), cursor=st.integers(0, 300))
    def end_and_tail(self, data: st.DataObject, cursor: int) -> None:
        sid = data.draw(st.sampled_from([s for s in SESSIONS if s not in self.ended]))

        async def go() -> list[Envelope]:
            await self.log.end_session(sid)
            try:
                await self.log.emit(sid, "message", "too late")
            except SessionEnded:
                pass
            else:
                raise AssertionError("an ended session accepted an event")
            return [e async for e in self.log.tail(sid, min(cursor, len(self.model[sid])))]

        seen = self.run(go)
        self.ended.add(sid)
        self.model[sid] = self.run(read_all, self.log, sid)
        assert self.model[sid][-1].type == "session.ended"
        assert_tail_exact(seen, self.model[sid], min(cursor, len(self.model[sid]) - 1))

    @invariant()
    def log_is_the_model(self) -> None:
        if not self.model:
            return
        for sid in SESSIONS:
            log = self.run(read_all, self.log, sid)
            assert_same_events(log, self.model[sid])
            assert self.run(self.log.last_seq, sid) == len(log)
            assert_latest_signals(log, self.run(self.log.latest_signals, sid))


def _norm(payload: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(payload))


def test_log_state_machine(redis_server_factory: Callable[..., RedisServer]) -> None:
    LogMachine.server = redis_server_factory(appendfsync="always")
    run_state_machine_as_test(
        LogMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=10,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
