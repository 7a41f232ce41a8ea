"""``eventcore tail`` as a real child process against real redis-server processes."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from cli_process import run_cli

from eventcore import EventLog, load_settings
from eventcore._follow import Event
from eventcore.server._tail import Renderer, summarize
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import RedisServer

DEADLINE = 60  # generous: the machine is shared; nothing here measures time


def _env(url: str, namespace: str, **extra: str) -> dict[str, str]:
    # the CLI must address the same keys: same namespace and shard count as the fixtures
    return {"EVENTCORE_REDIS_URL": url, "EVENTCORE_NAMESPACE": namespace,
            "EVENTCORE_SHARDS": "4", **extra}


async def test_tail_json_follows_history_then_live_until_the_session_ends(
    event_log: EventLog, redis_url: str
) -> None:
    s = await event_log.create_session("echo")
    await event_log.emit(s.session_id, "input", {"text": "hi"}, server_data={"secret": 1})
    ns = event_log.settings.namespace
    with anyio.fail_after(DEADLINE):
        async with run_cli("tail", s.session_id, "--json", env=_env(redis_url, ns)) as cli:
            got = [await cli.envelope(), await cli.envelope()]  # history
            await cli.wait_stderr("following from seq 0")
            await event_log.signal(s.session_id, "status", "thinking")
            got.append(await cli.envelope())  # live
            await event_log.emit(s.session_id, "message", {"text": "hi"})
            await event_log.end_session(s.session_id)
            got += [await cli.envelope(), await cli.envelope()]
            assert await cli.proc.wait() == 0
            out, err = await cli.rest()
    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
    assert [e["type"] for e in got] == ["session.created", "input", "signal", "message",
                                        "session.ended"]
    assert all("server_data" not in e for e in got)
    assert out == ""  # nothing after session.ended
    assert "session ended (completed)" in err


async def test_tail_after_and_types_filter_but_still_stop_at_the_end(
    event_log: EventLog, redis_url: str
) -> None:
    s = await event_log.create_session("echo")
    for i in range(3):
        await event_log.emit(s.session_id, "message", {"text": str(i)})
    await event_log.end_session(s.session_id)
    with anyio.fail_after(DEADLINE):
        async with run_cli("tail", s.session_id, "--json", "--after", "2", "--types", "message",
                           env=_env(redis_url, event_log.settings.namespace)) as cli:
            assert await cli.proc.wait() == 0
            out, _ = await cli.rest()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(e["seq"], e["payload"]["text"]) for e in lines] == [(3, "1"), (4, "2")]


async def test_tail_of_an_unknown_session_fails_clearly(event_log: EventLog, redis_url: str
                                                        ) -> None:
    with anyio.fail_after(DEADLINE):
        async with run_cli("tail", "no-such-session",
                           env=_env(redis_url, event_log.settings.namespace)) as cli:
            assert await cli.proc.wait() == 1
            out, err = await cli.rest()
    assert "does not exist" in err and out == ""


async def test_tail_rejects_a_hostile_session_id(event_log: EventLog, redis_url: str) -> None:
    with anyio.fail_after(DEADLINE):
        async with run_cli("tail", "../../etc/passwd\x1b[31m",
                           env=_env(redis_url, event_log.settings.namespace)) as cli:
            assert await cli.proc.wait() == 1
            _, err = await cli.rest()
    assert "invalid session id" in err


@pytest.mark.redis_restart
async def test_tail_resumes_across_a_redis_outage_with_no_gap_and_no_duplicate(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    ns = unique_namespace()
    settings = load_settings(redis_url=server.url, namespace=ns, shards=4, retry_budget_s=10)
    async with EventLog(settings) as log:
        s = await log.create_session("echo")
        for i in range(3):
            await log.emit(s.session_id, "message", {"n": i})
        # a one-second retry budget: the outage below outlasts it, so the CLI's own resume
        # loop (not just redis-py's retries) is what carries it across
        env = _env(server.url, ns, EVENTCORE_RETRY_BUDGET_S="1")
        with anyio.fail_after(DEADLINE):
            async with run_cli("tail", s.session_id, "--json", env=env) as cli:
                seen = [await cli.envelope() for _ in range(4)]
                await anyio.to_thread.run_sync(server.kill)  # SIGKILL; AOF fsync=always
                await cli.wait_stderr("Redis unavailable")
                await anyio.to_thread.run_sync(server.start)
                for i in range(3, 6):
                    await log.emit(s.session_id, "message", {"n": i})
                await log.end_session(s.session_id)
                while not seen or seen[-1]["type"] != "session.ended":
                    seen.append(await cli.envelope())
                assert await cli.proc.wait() == 0
    assert [e["seq"] for e in seen] == list(range(1, 9))
    assert [e["payload"]["n"] for e in seen if e["type"] == "message"] == list(range(6))


def test_renderer_prints_payload_text_literally_and_keeps_a_status_line() -> None:
    buf = io.StringIO()
    r = Renderer("s1", raw=False, out=buf, force_terminal=True)
    with r:
        r.notify("live", "following from seq 0")
        data = json.dumps({"seq": 1, "type": "message", "session_id": "s1",
                           "ts": "2026-01-01T00:00:00Z", "payload": {"text": "[bold]hi[/]"}})
        r.item(Event(1, "message", data.encode()))
        r.notify("retry", "Redis unavailable; retrying")
    text = buf.getvalue()
    assert "[bold]hi[/]" in text  # markup in payloads is data, not formatting
    assert "retry" in text and "seq 1" in text  # the status line saw both states
    assert r.last == 1 and r.count == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"type": "signal", "payload": {"key": "k", "value": [1]}}, "k = [1]"),
        ({"type": "signal", "payload": {"key": "k", "summary": {"size": 9000}}},
         "k = <9000 bytes>"),
        ({"type": "run.failed", "payload": {"name": "r", "error": {"type": "E",
                                                                   "message": "m"}}},
         "r error=E: m"),
        ({"type": "tool.ended", "payload": {"tool": "t", "call_id": "c", "result": 2}},
         "t[c] 2"),
        ({"type": "custom.kind", "payload": [1, 2]}, "[1,2]"),
        ({"type": "message", "payload": None}, ""),
    ],
)
def test_summaries_by_kind(env: dict[str, object], expected: str) -> None:
    assert summarize(env) == expected


async def test_tail_from_redis_stops_at_session_deleted_and_never_follows_the_next_session(
    event_log: EventLog, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower is mid catch-up when the session is deleted and created again: it ends
    there (told so), never taking the new session's events for the old one's."""
    from eventcore import Envelope
    from eventcore.server._tail import follow_redis

    for name, value in _env(redis_url, event_log.settings.namespace).items():
        monkeypatch.setenv(name, value)
    sid = (await event_log.create_session("echo")).session_id
    await event_log.append_many([Envelope(type="note", session_id=sid, payload={"gen": "old"})
                                 for _ in range(300)])
    notes: list[tuple[str, str]] = []
    items = follow_redis(sid, 0, lambda k, t: notes.append((k, t)))
    seqs: list[int] = []
    with anyio.fail_after(DEADLINE):
        first = await items.__anext__()
        assert isinstance(first, Event)
        seqs.append(first.seq)
        assert await event_log.delete_session(sid)
        await event_log.create_session("echo", session_id=sid)
        await event_log.append_many([Envelope(type="note", session_id=sid,
                                              payload={"gen": "new"}) for _ in range(400)])
        async for item in items:
            assert isinstance(item, Event) and b'"new"' not in item.data, item
            seqs.append(item.seq)
    assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] < 301
    assert ("info", "the session was deleted; its id may name a new session now") in notes


async def test_tail_from_redis_follows_a_diverged_stream_and_resumes_in_its_epoch(
    event_log: EventLog, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As over ``--url``: after a failover lost seqs 8..10 and they were written again, tail
    straight from Redis says history was rewritten (no gap: nothing is missing), yields the new
    8..13, and a tail resumed with ``<seq>.<epoch>`` (what a stopped tail prints) goes on in that
    epoch; a bare seq there is generation 0, and is reset to where the histories part."""
    from divergence import lose_tail

    from eventcore import Envelope
    from eventcore.server._tail import follow_redis, parse_cursor

    for name, value in _env(redis_url, event_log.settings.namespace).items():
        monkeypatch.setenv(name, value)
    log = event_log
    sid = (await log.create_session("echo")).session_id
    await log.append_many([Envelope(type="note", session_id=sid, payload={"v": "old", "i": i})
                           for i in range(9)])  # seqs 2..10
    notes: list[tuple[str, str]] = []
    got: list[Any] = []
    items = follow_redis(sid, 0, lambda k, t: notes.append((k, t)))

    async def take(source: AsyncIterator[Any], into: list[Any], n: int) -> None:
        while len(into) < n:
            into.append(await source.__anext__())

    with anyio.fail_after(DEADLINE):
        await take(items, got, 10)
        await lose_tail(log, sid, 7)
        await log.append_many([Envelope(type="note", session_id=sid,
                                        payload={"v": "new", "i": i}) for i in range(6)])
        await take(items, got, 16)
        await items.aclose()
    assert all(isinstance(e, Event) for e in got), got
    assert [e.seq for e in got] == list(range(1, 11)) + list(range(8, 14))
    assert all(b'"new"' in e.data for e in got[10:])
    assert [t for _, t in notes if "rewritten" in t] == [
        "history after seq 7 was rewritten (a failover lost writes); continuing from there"]
    epoch = got[-1].generation
    assert epoch != "" and {e.generation for e in got[10:]} == {epoch}
    await log.emit(sid, "note", {"v": "later"})  # seq 14

    # resumed in its epoch: only what came after, no reset
    seq, gen = parse_cursor(f"13.{epoch}")
    resumed: list[Any] = []
    notes.clear()
    items = follow_redis(sid, seq, lambda k, t: notes.append((k, t)), epoch=gen)
    with anyio.fail_after(DEADLINE):
        await take(items, resumed, 1)
        await items.aclose()
    assert [getattr(e, "seq", e) for e in resumed] == [14]
    assert not [t for _, t in notes if "rewritten" in t]
    # a bare 13 reads as generation 0: above where the histories part, so it is told so
    notes.clear()
    bare: list[Any] = []
    items = follow_redis(sid, 13, lambda k, t: notes.append((k, t)))
    with anyio.fail_after(DEADLINE):
        await take(items, bare, 7)
        await items.aclose()
    assert [getattr(e, "seq", e) for e in bare] == list(range(8, 15))
    assert [t for _, t in notes if "rewritten" in t] == [
        "history after seq 7 was rewritten (a failover lost writes); continuing from there"]


def test_parse_cursor_takes_a_seq_or_seq_dot_epoch() -> None:
    from eventcore.server._tail import TailError, parse_cursor

    assert parse_cursor("0") == (0, "")
    assert parse_cursor("12") == (12, "")
    assert parse_cursor("12.0") == (12, "")
    assert parse_cursor("12.1764691200000000") == (12, "1764691200000000")
    for bad in ("", "x", "-1", "12.a", ".5"):
        with pytest.raises(TailError):
            parse_cursor(bad)
