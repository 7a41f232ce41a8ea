"""``eventcore tail``: follow one session live in the terminal, resuming after interruptions.

Two ways in: straight from Redis (``EVENTCORE_REDIS_URL``, or the embedded Redis of the data
dir) through the core :class:`~eventcore._follow.Follower`, or through a server's SSE endpoint
(``--url``) with ``Last-Event-ID`` on every reconnect. Either way the follower keeps the last
seq it printed and resumes after it: a Redis or server restart shows up as a "reconnecting"
status, never as a missing or repeated line. Both yield the same items: an
:class:`~eventcore._follow.Event`, or a :class:`~eventcore.HistoryGone` where history is gone
(the stream goes on after it).
"""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TextIO

import anyio
import msgspec
from rich.console import Console
from rich.status import Status
from rich.text import Text

from eventcore._follow import Event, FollowRetry, LogFollowers, backoff, closing_iter
from eventcore._log import EventLog
from eventcore._settings import load_settings
from eventcore.errors import (
    EventcoreError,
    HistoryDiverged,
    HistoryGone,
    SessionNotFound,
    TailError,
)

__all__ = ["TailError", "follow_http", "follow_redis", "parse_cursor", "run_tail"]

Notify = Callable[[str, str], None]  # (kind, text): kind is "live" or "retry"
_Item = Event | HistoryGone

_DELETED = "the session was deleted; its id may name a new session now"


def parse_cursor(text: str) -> tuple[int, str]:
    """``--after``: ``<seq>`` or ``<seq>.<epoch>`` (what an interrupted tail prints, and the
    SSE id) -> (seq, generation; ``""`` for 0)."""
    seq, _, epoch = text.strip().partition(".")
    if not seq.isdigit() or (epoch and not epoch.isdigit()):
        raise TailError(f"--after takes <seq> or <seq>.<epoch> (digits), got {text!r:.40}")
    return int(seq), "" if epoch in ("", "0") else epoch


# -- sources --------------------------------------------------------------------------------------
def _rewritten(last: int) -> str:
    """What both ways in say when a failover lost writes after ``last`` (a diverged epoch)."""
    return (f"history after seq {last} was rewritten (a failover lost writes); continuing "
            "from there")


async def follow_redis(session_id: str, after: int, notify: Notify, *, epoch: str = ""
                       ) -> AsyncIterator[_Item]:
    """The session's events straight from Redis, across Redis outages. ``epoch``: the stream
    generation ``after`` was read in (``""``: 0), as ``--url`` sends it in ``Last-Event-ID``:
    a cursor of a newer generation than 0 is then not taken for one of the lost history."""
    async with EventLog(load_settings()) as log:
        try:
            info = await log.get_session(session_id)
        except SessionNotFound:
            raise TailError(f"session {session_id!r} does not exist") from None
        notify("info", f"session {session_id} · agent {info.agent or '-'} · state {info.state} "
                       f"· {info.last_seq} events")
        notify("state", info.state)
        retrying = False

        def on_retry(r: FollowRetry) -> None:
            nonlocal retrying
            retrying = True
            notify("retry", f"Redis unavailable; retrying in {r.delay_s:.1f}s (attempt "
                            f"{r.attempt}), resuming after seq {r.last_seq}")

        notify("live", f"following from seq {after}")
        try:
            async with (
                LogFollowers(log).subscribe(session_id, after, incarnation=info.incarnation,
                                            retry_cap_s=5.0, on_retry=on_retry) as follower,
                closing_iter(follower.batches()) as batches,
            ):
                follower.generation = "" if epoch == "0" else epoch
                async for batch in batches:
                    if retrying:
                        retrying = False
                        notify("live", f"following again after seq {follower.cursor}")
                    if isinstance(batch, HistoryDiverged):
                        # as over --url: the follower moved back to resume_after in the new
                        # generation; what follows replaces the lost seqs (no gap)
                        notify("info", _rewritten(batch.resume_after))
                        continue
                    if isinstance(batch, HistoryGone):
                        yield batch
                        continue
                    for ev in batch:
                        yield ev
        except SessionNotFound:
            # not resumable: following on would follow whatever session the id names next
            notify("info", _DELETED)


class _Retry(EventcoreError):
    def __init__(self, message: str, after_s: float | None = None) -> None:
        super().__init__(message)
        self.after_s = after_s


def _problem_detail(response: Any, body: bytes) -> str:
    try:
        problem = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return f"HTTP {response.status_code}"
    if isinstance(problem, dict):
        return f"HTTP {response.status_code}: {problem.get('detail') or problem.get('title')}"
    return f"HTTP {response.status_code}"


async def follow_http(
    base_url: str,
    token: str | None,
    session_id: str,
    after: int,
    notify: Notify,
    *,
    read_timeout_s: float = 60.0,
    backoff_cap_s: float = 5.0,
    epoch: str = "",
) -> AsyncIterator[_Item]:
    """The session's events from ``GET /v1/sessions/{id}/events`` (SSE), reconnecting with
    ``Last-Event-ID`` after drops, server restarts and 5xx answers. It asks for every type:
    the stream must reach ``session.ended`` for the follower to know it is over."""
    import httpx
    from httpx_sse import SSEError, aconnect_sse

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last, attempt = after, 0
    # the stream's generation once an id carried one (`<seq>.<epoch>`), or the caller's
    epoch = "" if epoch == "0" else epoch
    hint: float | None = None  # the server's `retry:` advice, in seconds
    timeout = httpx.Timeout(10.0, read=read_timeout_s)  # heartbeats keep a live stream busy
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client:
        await _describe_session(client, session_id, notify)
        while True:
            resume = f"{last}.{epoch}" if epoch else str(last)
            req_headers = {"Last-Event-ID": resume} if last or epoch else {}
            try:
                async with aconnect_sse(client, "GET", f"/v1/sessions/{session_id}/events",
                                        headers=req_headers) as source:
                    response = source.response
                    if response.status_code == 204:
                        # ended, and everything up to its last seq was seen already
                        notify("info", f"the session has ended; nothing after seq {last}")
                        return
                    if response.status_code != 200:
                        detail = _problem_detail(response, await response.aread())
                        if response.status_code >= 500 or response.status_code == 429:
                            raise _Retry(detail, _retry_after(response))
                        raise TailError(detail)
                    notify("live", f"connected to {base_url}, following from seq {last}")
                    attempt = 0
                    async for sse in source.aiter_sse():
                        if sse.retry is not None:
                            hint = sse.retry / 1000
                        if sse.event == "stream.reset":
                            diverged = _diverged(sse.data)
                            if diverged is not None:
                                # a failover lost seqs after resume_after, and they may have
                                # been written again: what follows replaces them
                                last, epoch = diverged
                                notify("info", _rewritten(last))
                                continue
                            first = _first_available(sse.data, sse.id)
                            if first is not None and first > last + 1:
                                yield HistoryGone(session_id, last, first)
                                last = first - 1
                            continue
                        if sse.event == "session.deleted":
                            # not resumable: reconnecting would follow whatever session the
                            # id names next (its seqs restart at 1)
                            notify("info", _DELETED)
                            return
                        seq_text, _, id_epoch = sse.id.partition(".")
                        if not seq_text.isdigit():
                            if sse.data:
                                notify("info", f"server: {sse.event}: {sse.data[:200]}")
                            continue
                        seq = int(seq_text)
                        if seq <= last:
                            continue  # never print a seq twice
                        last, epoch = seq, id_epoch
                        yield Event(seq, sse.event, sse.data.encode(), generation=id_epoch)
                        if sse.event == "session.ended":
                            return
                raise _Retry("the server closed the stream")
            except (httpx.TransportError, SSEError, _Retry) as exc:
                attempt += 1
                delay = backoff(attempt, backoff_cap_s)
                if isinstance(exc, _Retry) and exc.after_s is not None:
                    delay = max(delay, exc.after_s)
                elif hint is not None:
                    delay = max(delay, min(hint, 30.0))
                notify("retry", f"{_describe(exc)}; reconnecting in {delay:.1f}s (attempt "
                                f"{attempt}), resuming after seq {last}")
                await anyio.sleep(delay)


async def _describe_session(client: Any, session_id: str, notify: Notify) -> None:
    """Say what the session is, if the server answers (the stream itself reports failures)."""
    import httpx

    try:
        r = await client.get(f"/v1/sessions/{session_id}")
    except httpx.HTTPError:
        return
    if r.status_code != 200:
        return
    try:
        info = msgspec.json.decode(r.content)
    except msgspec.DecodeError:
        return
    if isinstance(info, dict) and isinstance(info.get("state"), str):
        notify("info", f"session {session_id} · agent {info.get('agent') or '-'} · state "
                       f"{info['state']} · {info.get('last_seq', '?')} events")
        notify("state", info["state"])


def _diverged(data: str) -> tuple[int, str] | None:
    """``(resume_after, epoch)`` of a ``stream.reset`` for a diverged history, else ``None``."""
    try:
        reset = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    if not isinstance(reset, dict) or reset.get("reason") != "diverged":
        return None
    after, epoch = reset.get("resume_after"), reset.get("epoch")
    if not isinstance(after, int) or after < 0 or not isinstance(epoch, str):
        return None
    return after, "" if epoch == "0" else epoch


def _first_available(data: str, event_id: str) -> int | None:
    """Where a ``stream.reset`` says the stream continues (its data, else its id + 1)."""
    try:
        value = msgspec.json.decode(data).get("first_available")
    except (msgspec.DecodeError, AttributeError):
        value = None
    if isinstance(value, int) and value > 0:
        return value
    seq = event_id.partition(".")[0]
    return int(seq) + 1 if seq.isdigit() else None


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."


# -- rendering ------------------------------------------------------------------------------------
_STYLES = {
    "session": "bold magenta", "run": "blue", "tool": "cyan", "input": "green",
    "signal": "yellow", "effect": "bright_blue", "message": "bold", "log": "dim",
}
_BAD = ("failed", "timed_out", "cancelled")


def _style(kind: str) -> str:
    if kind.endswith(_BAD):
        return "bold red"
    return _STYLES.get(kind.split(".", 1)[0], "white")


def _compact(value: Any, limit: int = 400) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summarize(env: dict[str, Any]) -> str:
    """One line saying what the envelope is about, by kind."""
    kind, p = env.get("type", ""), env.get("payload")
    if not isinstance(p, dict):
        return "" if p is None else _compact(p)
    error = p.get("error")
    err = f" error={error.get('type')}: {error.get('message')}" if isinstance(error, dict) else ""
    if kind == "session.created":
        return f"agent={p.get('agent')}" + (f" labels={_compact(p['labels'])}"
                                            if p.get("labels") else "")
    if kind == "session.ended":
        return f"reason={p.get('reason', 'completed')}{err}"
    if kind.startswith("run."):
        ms = p.get("duration_ms")
        took = f" {ms:.0f}ms" if isinstance(ms, int | float) else ""
        return f"{p.get('name', '')}{took}{err}"
    if kind.startswith("tool."):
        what = p.get("result") if kind == "tool.ended" else p.get("args")
        return f"{p.get('tool')}[{p.get('call_id')}] {_compact(what, 200)}{err}"
    if kind == "signal":
        if isinstance(p.get("summary"), dict):
            return f"{p.get('key')} = <{p['summary'].get('size')} bytes>"
        return f"{p.get('key')} = {_compact(p.get('value'), 200)}"
    if kind == "effect":
        return f"{p.get('key')} {p.get('status')} {_compact(p.get('result'), 200)}{err}"
    if kind == "message" and isinstance(p.get("text"), str):
        return str(p["text"])
    return _compact(p)


def _clock(ts: Any) -> str:
    try:
        when = _dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    except ValueError:
        return "--:--:--.---"
    return when.astimezone().strftime("%H:%M:%S.%f")[:-3]


_STATE_AFTER = {
    "session.created": "created", "run.started": "running", "run.completed": "idle",
    "run.failed": "idle", "run.cancelled": "idle", "run.timed_out": "idle",
    "session.ended": "ended",
}


class Renderer:
    """Prints envelopes (rich lines, or raw JSON lines with ``--json``) and keeps the status
    line: where the follower is, the session's state, and whether it is reconnecting."""

    def __init__(self, session_id: str, *, raw: bool, types: frozenset[str] | None = None,
                 out: TextIO | None = None, force_terminal: bool | None = None) -> None:
        self.session_id = session_id
        self.raw = raw
        self.types = types
        self._out = out or sys.stdout
        self.console = Console(file=self._out, highlight=False, force_terminal=force_terminal)
        self.err = Console(file=sys.stderr, highlight=False)
        self.last = 0
        self.epoch = ""  # the generation of the last event printed ("": 0)
        self.count = 0
        self.state = "?"
        self.ended: dict[str, Any] | None = None
        self._status: Status | None = None
        self._link = "connecting"

    def __enter__(self) -> Renderer:
        if not self.raw and self.console.is_terminal:
            self._status = self.console.status(self._status_text(), spinner="dots")
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def _status_text(self) -> Text:
        style = {"live": "green", "retry": "yellow", "end": "blue"}.get(self._link, "dim")
        return Text.assemble(
            (f" {self._link} ", f"reverse {style}"), " ", (self.session_id, "bold"),
            f"  seq {self.last}  state {self.state}  {self.count} events",
        )

    def notify(self, kind: str, text: str) -> None:
        if kind == "state":  # the session's state as the server knows it; not a message
            self.state = text
            self._refresh()
            return
        if kind in ("live", "retry"):
            self._link = kind
        self._refresh()
        if self.raw or not self.console.is_terminal:
            # scripts read stderr; the stream itself stays machine-readable
            self.err.print(f"eventcore tail: {text}", markup=False, soft_wrap=True)
        else:
            colour = {"retry": "yellow", "live": "green", "gap": "red"}.get(kind, "dim")
            self.console.print(Text(f"· {text}", style=colour))

    def _refresh(self) -> None:
        if self._status is not None:
            self._status.update(self._status_text())

    def gap(self, gone: HistoryGone) -> None:
        self.last = gone.resume_after
        self.notify("gap", f"history after seq {gone.after} is gone; continuing at seq "
                           f"{gone.first_available}")

    def item(self, item: Event) -> None:
        self.last = item.seq
        self.epoch = item.generation
        self.state = _STATE_AFTER.get(item.type, self.state)
        if item.type == "session.ended":
            try:
                self.ended = msgspec.json.decode(item.data)
            except msgspec.DecodeError:
                self.ended = {}
        shown = self.types is None or item.type in self.types
        self.count += shown
        self._refresh()  # before printing: the line and the status agree
        if not shown:
            return
        if self.raw:
            self._out.write(item.data.decode() + "\n")
            self._out.flush()
        else:
            try:
                env = msgspec.json.decode(item.data)
            except msgspec.DecodeError:
                env = {"type": item.type}
            if not isinstance(env, dict):
                env = {"type": item.type}
            run = env.get("run_id")
            line = Text.assemble(
                (f"{item.seq:>6} ", "bold cyan"), (f"{_clock(env.get('ts'))} ", "dim"),
                (f"{item.type:<15}", _style(item.type)), " ",
                (f"run={str(run)[:8]} ", "dim") if run else "",
                summarize(env),
            )
            line.no_wrap = True
            line.overflow = "ellipsis"
            self.console.print(line)

    def finish(self) -> None:
        if self.ended is None:
            return
        payload = self.ended.get("payload") or {}
        reason = payload.get("reason", "completed") if isinstance(payload, dict) else "?"
        self.notify("end", f"session ended ({reason}) · {self.count} events shown · "
                           f"last seq {self.last}")

    def interrupted(self) -> None:
        # the cursor with its generation once the stream diverged (`--after <seq>.<epoch>`):
        # a bare seq is generation 0, and would be reset again
        cursor = f"{self.last}.{self.epoch}" if self.epoch else str(self.last)
        self.notify("stop", f"stopped at seq {self.last}; resume with: eventcore tail "
                            f"{self.session_id} --after {cursor}")


async def run_tail(
    session_id: str,
    *,
    after: int = 0,
    epoch: str = "",
    url: str | None = None,
    token: str | None = None,
    renderer: Renderer,
) -> None:
    renderer.last, renderer.epoch = after, epoch
    if url is not None:
        source = follow_http(url.rstrip("/"), token, session_id, after, renderer.notify,
                             epoch=epoch)
    else:
        source = follow_redis(session_id, after, renderer.notify, epoch=epoch)
    async with closing_iter(source) as items:
        async for item in items:
            if isinstance(item, HistoryGone):
                renderer.gap(item)
            else:
                renderer.item(item)
    renderer.finish()
