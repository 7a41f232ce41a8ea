"""The handle a handler gets: its session's inputs, runs, tools, signals, effects, emits.

Every event a handler writes gets a *deterministic* event key derived from where the handler is
(which input it is answering, which run, the how-many-th call of its kind), so a handler that is
run again from the start after a crash, a drain or an idle unload re-emits the same keys and the
log keeps the first of each. Tools and effects go through the effect ledger, so they return
their recorded result instead of running twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio

from eventcore import (
    AppendResult,
    Envelope,
    ErrorInfo,
    EventLog,
    RunPayload,
    SessionCheckpointPayload,
    ToolPayload,
    decode_payload,
)
from eventcore.errors import (
    EffectFailed,
    RunTimedOut,
    SessionEnded,
    StaleHost,
    ValidationError,
)

if TYPE_CHECKING:
    from ._app import AgentSpec

__all__ = ["Run", "Session"]

T = TypeVar("T")
A = TypeVar("A")

_RESERVED = ("input", "signal", "effect")
_RESERVED_PREFIXES = ("session.", "control.", "run.", "tool.")
_log = logging.getLogger("workers")
TRACEBACK_LIMIT = 16_000
"""Characters of a failed run's traceback kept in ``server_data`` (the innermost frames)."""


def format_traceback(exc: BaseException) -> str:
    """The exception's traceback as text, at most :data:`TRACEBACK_LIMIT` characters (the
    end is kept: the innermost frames and the error)."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    if len(text) > TRACEBACK_LIMIT:
        text = "...\n" + text[-TRACEBACK_LIMIT:]
    return text


RUN_TERMINAL = frozenset({"run.completed", "run.failed", "run.cancelled", "run.timed_out"})


class HostContext(Protocol):
    """What a session needs from the worker hosting it."""

    log: EventLog
    lease_ttl_s: float

    @property
    def draining(self) -> bool: ...

    async def unload(self, session: Session) -> None: ...

    def fenced(self, session: Session) -> None: ...

    def written(self, session: Session) -> None: ...


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not name.isprintable():
        raise ValidationError(f"{what} must be 1-100 printable characters, got {name!r:.80}")
    return name


class Session:
    """A hosted session, as its handler sees it. One per hosting: a re-hosted session gets a
    new handle (a new ``epoch``) and its handler starts from the beginning."""

    __slots__ = (
        "__weakref__", "_counts", "_ctx", "_cursor", "_deadline", "_ended", "_finished_runs",
        "_idle_timeout_s", "_inputs", "_last_input", "_own", "_position", "_restored",
        "_run_cancels", "_run_timeout_s", "_runs", "_scope", "_stop_reason", "_wake", "agent",
        "attempt", "checkpoint_seq", "entry_id", "epoch", "fetching", "id", "inflight", "known",
        "labels", "refetch", "shard", "spec",
    )

    def __init__(
        self,
        ctx: HostContext,
        session_id: str,
        spec: AgentSpec,
        *,
        epoch: int,
        attempt: int,
        entry_id: str,
        shard: int,
        labels: dict[str, str],
        deadline: float = math.inf,
        run_timeout_s: float | None = None,
        idle_timeout_s: float = math.inf,
    ) -> None:
        self._ctx = ctx
        self.id = session_id
        self.spec = spec
        self.agent = spec.name
        self.epoch = epoch
        #: 1 on the first try; n on the n-th retry after failures (crash recovery, drain and
        #: idle unload re-host the session without counting an attempt)
        self.attempt = attempt
        self.entry_id = entry_id
        self.shard = shard
        self.labels = labels
        #: the feed's bookkeeping: a read is in flight; read again regardless of ``known``;
        #: the highest seq known to exist (from notifications)
        self.fetching = False
        self.refetch = False
        self.known = 0
        #: own appends in flight: their notifications can beat their replies, and reading
        #: them back is wasted (see :meth:`defer_read`)
        self.inflight = 0
        self._deadline = deadline
        self._run_timeout_s = run_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._cursor = 0
        self._own: set[int] = set()
        self._inputs: deque[Envelope] = deque()
        self._wake: anyio.Event | None = None
        self._ended = False
        self._stop_reason: str | None = None
        self._scope: anyio.CancelScope | None = None
        self._runs: dict[str, Run] = {}
        self._run_cancels: set[str] = set()
        self._finished_runs: set[str] = set()
        self._position = "i0"
        self._counts: dict[str, int] = {}
        #: the seq of the handler's last checkpoint (from the claim), its state, and the last
        #: input handed to the handler (what a checkpoint taken now covers)
        self.checkpoint_seq = 0
        self._restored: Any = None
        self._last_input = 0

    # -- the handler's API -------------------------------------------------------------------
    @property
    def log(self) -> EventLog:
        return self._ctx.log

    async def inputs(self) -> AsyncIterator[Envelope]:
        """The session's ``input`` envelopes in seq order, from the first (a re-hosted handler
        sees them all again). Ends when the session ends. After the agent's idle timeout with
        no input the session is unloaded: this handler is cancelled, and the next input hosts
        the session again. A draining worker unloads a session as soon as it waits here."""
        while True:
            if self._inputs:
                env = self._inputs.popleft()
                self._last_input = env.seq
                self._position = f"i{env.seq}"
                self._counts = {}
                yield env
                continue
            if self._ended:
                return
            if self._ctx.draining:  # nothing to finish: let another worker take it on input
                await self._ctx.unload(self)
                await anyio.lowlevel.checkpoint()
                continue
            self._wake = anyio.Event()
            with anyio.move_on_after(self._idle_timeout_s) as idle:
                await self._wake.wait()
            self._wake = None
            if idle.cancelled_caught and not self._inputs and not self._ended:
                await self._ctx.unload(self)
                await anyio.lowlevel.checkpoint()

    @property
    def restored(self) -> Any:
        """The state of the handler's last :meth:`checkpoint` (``None`` if it has none): a
        re-hosted handler starts from it, and :meth:`inputs` resumes after the last input that
        checkpoint covers instead of replaying the session from its first input."""
        return self._restored

    async def checkpoint(self, state: Any) -> AppendResult:
        """Save ``state`` (any JSON-encodable value) as covering every input :meth:`inputs`
        has given so far. Take it when an input is fully handled (after its run): a later
        hosting restores it (:attr:`restored`) and is given only the inputs after it, so
        waking a long session costs what happened since its last checkpoint, not its whole
        history. Recorded as a ``session.checkpoint`` envelope (payload ``{"after": seq}``);
        the state travels in its ``server_data``, never sent to clients."""
        key = f"{self._position}/checkpoint:{self._next('checkpoint')}"
        return await self._append("session.checkpoint",
                                  SessionCheckpointPayload(after=self._last_input), key,
                                  server_data=state)

    def _restore(self, env: Envelope) -> None:
        """Before the handler starts: take the state of checkpoint ``env`` and read the history
        only after the last input it covers."""
        after = decode_payload(env).after
        self._restored = env.server_data
        self._last_input = after
        if after > self._cursor:
            self._cursor = after
            self._own = {q for q in self._own if q > after}
            self._advance()

    def run(self, name: str, *, timeout_s: float | None = None) -> Run:
        """``async with session.run("name") as run:`` records ``run.started`` and then
        ``run.completed``, ``run.failed`` (the exception propagates), ``run.cancelled`` (a
        cancel request for this run: the block is left and execution continues after it) or
        ``run.timed_out`` (:class:`RunTimedOut` propagates)."""
        _check_name(name, "run name")
        n = self._next(f"run:{name}")
        run_id = f"{self._position}.{name}.{n}"
        return Run(self, name, run_id, timeout_s if timeout_s is not None
                   else self._run_timeout_s)

    async def emit(
        self, type: str, payload: Any = None, *, key: str | None = None,
        server_data: Any = None, run_id: str | None = None,
    ) -> AppendResult:
        """Append an envelope of any non-reserved type (``message``, ``log``, your own...)."""
        _check_emit_type(type)
        key = key or f"{self._position}/{type}:{self._next(type)}"
        return await self._append(type, payload, key, run_id=run_id, server_data=server_data)

    async def signal(
        self, key: str, value: Any, *, event_key: str | None = None,
        summarize: bool | None = None, run_id: str | None = None,
    ) -> AppendResult:
        """Publish a signal (see :meth:`EventLog.signal`)."""
        event_key = event_key or f"{self._position}/signal:{key}:{self._next('signal:' + key)}"
        return await self._own_write(self._ctx.log.signal(
            self.id, key, value, event_key=event_key, summarize=summarize, run_id=run_id,
            epoch=self.epoch))

    async def effect(
        self, key: str, fn: Callable[[], Awaitable[T]], *, run_id: str | None = None
    ) -> Any:
        """Run ``fn`` once for this session and ``key`` and record its result; a re-hosted
        handler gets the recorded result (see :meth:`EventLog.effect` for the guarantee)."""
        with self._host_checks():
            return await self._ctx.log.effect(self.id, key, fn, epoch=self.epoch,
                                              claim_ttl_s=self._ctx.lease_ttl_s, run_id=run_id)

    # -- internals -----------------------------------------------------------------------------
    def _next(self, kind: str) -> int:
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        return n

    async def _append(self, type: str, payload: Any, key: str, *, run_id: str | None = None,
                      server_data: Any = None) -> AppendResult:
        env = Envelope(type=type, session_id=self.id, payload=payload, event_key=key,
                       run_id=run_id, server_data=server_data)
        return await self._own_write(self._ctx.log.append(env, epoch=self.epoch))

    @contextlib.contextmanager
    def _host_checks(self) -> Iterator[None]:
        """A refused write ends hosting: fenced by a newer host, or the session has ended."""
        try:
            yield
        except StaleHost:
            self._ctx.fenced(self)
            raise
        except SessionEnded:
            self._stop("ended")
            raise

    async def _own_write(self, write: Awaitable[AppendResult]) -> AppendResult:
        """Await one of this session's own appends, counted in flight until it lands."""
        self.inflight += 1
        seq: int | None = None
        try:
            with self._host_checks():
                res = await write
            seq = res.seq
            return res
        finally:
            self._landed(seq)

    def _landed(self, seq: int | None) -> None:
        """An own append finished (at ``seq``, or failed)."""
        self.inflight -= 1
        if seq is not None:
            self._own_seq(seq)
        self._ctx.written(self)

    def defer_read(self) -> bool:
        """Whether every seq past the cursor the feed knows of may be one of our own appends
        still in flight (its notification came before its reply): then reading waits for the
        replies (:meth:`HostContext.written` re-marks the session). Anything more (another
        writer's entry, an unknown amount) is read at once, so a handler that writes without
        pause never starves its inputs or cancel requests."""
        if self.refetch or not self.inflight:
            return False
        unseen = self.known - self._cursor - sum(1 for q in self._own if q <= self.known)
        return unseen <= self.inflight

    def _own_seq(self, seq: int) -> None:
        """Our own write landed at ``seq``: the read cursor skips it without reading it back
        (it is neither an input nor a control event), as soon as it is contiguous."""
        if seq <= self._cursor:
            return
        self._own.add(seq)
        self._advance()

    def _advance(self) -> None:
        own = self._own
        while own and self._cursor + 1 in own:
            self._cursor += 1
            own.discard(self._cursor)

    def deliver(self, items: list[tuple[int, str, Envelope | None]]) -> None:
        """Entries read from the stream after the cursor, in seq order (``env`` decoded only
        for the types the host acts on)."""
        woke = False
        for seq, typ, env in items:
            if seq <= self._cursor:
                continue
            self._cursor = seq
            self._own.discard(seq)
            if env is None:
                continue
            if typ == "input":
                self._inputs.append(env)
                woke = True
            elif typ == "control.cancel":
                self._on_cancel(env)
            elif typ == "session.ended":
                self._ended = True
                woke = True
                self._stop("ended")
            elif typ in RUN_TERMINAL and env.run_id:
                self._finished_runs.add(env.run_id)
        self._advance()
        if woke and self._wake is not None:
            self._wake.set()

    def _on_cancel(self, env: Envelope) -> None:
        payload = env.payload if isinstance(env.payload, dict) else {}
        run_id = payload.get("run_id")
        if not run_id:
            self._stop("cancel")
        elif run_id in self._finished_runs:
            return  # that run had finished before the request was made
        elif run_id in self._runs:
            self._runs[run_id].cancel()
        else:
            self._run_cancels.add(str(run_id))  # it has not started yet (a replay is behind)

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def stop_reason(self) -> str | None:
        """Why the host stopped the handler (``cancel``, ``ended``, ``unload``, ``lost``,
        ``handback``), or ``timeout`` once the session deadline has passed."""
        if (self._stop_reason is None and self._deadline != math.inf
                and anyio.current_time() >= self._deadline):
            return "timeout"
        return self._stop_reason

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _stop(self, reason: str) -> None:
        # Losing the session and handing it back win over anything: after them the handler
        # must not write at all.
        if self._stop_reason is None or reason in ("lost", "handback"):
            self._stop_reason = reason
        if self._scope is not None:
            self._scope.cancel()


def _check_emit_type(type: str) -> None:
    if not isinstance(type, str) or not type:
        raise ValidationError("the event type must be a non-empty string")
    if type in _RESERVED or type.startswith(_RESERVED_PREFIXES):
        raise ValidationError(
            f"{type!r} is reserved: use inputs(), run(), run.tool(), signal() or effect()"
        )


class Run:
    """One run of a handler (``session.run(name)``): its events share ``run_id``."""

    __slots__ = ("_counts", "_scope", "_t0", "_timeout_s", "cancel_requested", "cancelled",
                 "id", "name", "session", "timed_out")

    def __init__(self, session: Session, name: str, run_id: str, timeout_s: float | None):
        self.session = session
        self.name = name
        self.id = run_id
        self._timeout_s = timeout_s
        self._counts: dict[str, int] = {}
        self._scope: anyio.CancelScope | None = None
        self._t0 = 0.0
        self.cancel_requested = False
        #: set when the run ended by a cancel request (the ``async with`` block was left)
        self.cancelled = False
        self.timed_out = False

    def cancel(self) -> None:
        self.cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()

    def _next(self, kind: str) -> int:
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        return n

    async def __aenter__(self) -> Run:
        s = self.session
        await s._append("run.started", RunPayload(name=self.name), f"{self.id}/started",
                        run_id=self.id)
        self._t0 = time.monotonic()
        deadline = (anyio.current_time() + self._timeout_s if self._timeout_s is not None
                    else math.inf)
        self._scope = anyio.CancelScope(deadline=deadline)
        self._scope.__enter__()
        s._runs[self.id] = self
        if self.id in s._run_cancels:
            s._run_cancels.discard(self.id)
            self.cancel()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        s = self.session
        assert self._scope is not None
        swallowed = self._scope.__exit__(et, exc, tb)
        s._runs.pop(self.id, None)
        ms = round((time.monotonic() - self._t0) * 1000, 3)
        if swallowed:
            if self.cancel_requested:
                self.cancelled = True
                await self._finish("run.cancelled", f"{self.id}/cancelled", None, ms)
                return True
            self.timed_out = True
            err = RunTimedOut(f"run {self.name!r} ({self.id}) exceeded {self._timeout_s} s")
            await self._finish("run.timed_out", f"{self.id}/timed_out@{s.attempt}",
                               ErrorInfo.from_exception(err), ms)
            raise err
        if et is None:
            await self._finish("run.completed", f"{self.id}/completed", None, ms)
            return False
        if issubclass(et, anyio.get_cancelled_exc_class()):
            reason = s.stop_reason
            if reason == "cancel":
                with anyio.CancelScope(shield=True):
                    await self._finish("run.cancelled", f"{self.id}/cancelled", None, ms)
            elif reason == "timeout":
                info = ErrorInfo(type="SessionTimedOut", message="the session timed out",
                                 retryable=False)
                with anyio.CancelScope(shield=True):
                    await self._finish("run.timed_out", f"{self.id}/timed_out@{s.attempt}",
                                       info, ms)
            return False
        if exc is None or isinstance(exc, StaleHost | SessionEnded):
            return False
        if isinstance(exc, Exception):
            trace = format_traceback(exc)
            # one line here: the handler may catch it; the worker logs the traceback when the
            # error ends the handler (workers._settle), and run.failed keeps it in server_data
            _log.warning("session %s: run %s (%s) failed on attempt %d: %s: %s", s.id,
                         self.name, self.id, s.attempt, type(exc).__name__, str(exc)[:500])
            await self._finish("run.failed", f"{self.id}/failed@{s.attempt}",
                               ErrorInfo.from_exception(exc), ms,
                               server_data={"traceback": trace})
        return False

    async def _finish(self, type: str, key: str, error: ErrorInfo | None, ms: float, *,
                      server_data: Any = None) -> None:
        s = self.session
        s._finished_runs.add(self.id)
        await s._append(type, RunPayload(name=self.name, error=error, duration_ms=ms), key,
                        run_id=self.id, server_data=server_data)

    # -- inside a run --------------------------------------------------------------------------
    async def emit(self, type: str, payload: Any = None, *, key: str | None = None,
                   server_data: Any = None) -> AppendResult:
        """Append an envelope of this run (``message``, ``log``, your own types...)."""
        _check_emit_type(type)
        key = key or f"{self.id}/{type}:{self._next(type)}"
        return await self.session._append(type, payload, key, run_id=self.id,
                                          server_data=server_data)

    async def tool(self, name: str, args: A, fn: Callable[[A], Awaitable[T]], *,
                   key: str | None = None) -> Any:
        """Call ``fn(args)`` as a tool: ``tool.started``, then ``tool.ended`` with its result
        (or error). Memoized through the effect ledger under the call id, so a re-hosted
        handler gets the recorded result without calling ``fn`` again."""
        _check_name(name, "tool name")
        s = self.session
        call_id = key or f"{self.id}/tool:{name}:{self._next('tool:' + name)}"
        await s._append("tool.started", ToolPayload(tool=name, call_id=call_id, args=args),
                        f"{call_id}/started", run_id=self.id)
        t0 = time.monotonic()
        try:
            result = await s.effect(call_id, lambda: fn(args), run_id=self.id)
        except EffectFailed as exc:
            info = ErrorInfo(type=exc.error_type, message=str(exc), retryable=exc.retryable)
            await s._append("tool.ended", ToolPayload(
                tool=name, call_id=call_id, error=info,
                duration_ms=round((time.monotonic() - t0) * 1000, 3)),
                f"{call_id}/failed@{s.attempt}", run_id=self.id)
            raise
        await s._append("tool.ended", ToolPayload(
            tool=name, call_id=call_id, result=result,
            duration_ms=round((time.monotonic() - t0) * 1000, 3)),
            f"{call_id}/ended", run_id=self.id)
        return result

    async def signal(self, key: str, value: Any, *, summarize: bool | None = None
                     ) -> AppendResult:
        event_key = f"{self.id}/signal:{key}:{self._next('signal:' + key)}"
        return await self.session.signal(key, value, event_key=event_key, summarize=summarize,
                                         run_id=self.id)

    async def effect(self, key: str, fn: Callable[[], Awaitable[T]]) -> Any:
        return await self.session.effect(key, fn, run_id=self.id)
