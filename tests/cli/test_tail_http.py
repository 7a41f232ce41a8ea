"""``eventcore tail --url``: the real CLI following the real service's SSE endpoint."""

from __future__ import annotations

import contextlib
import json

import anyio
import pytest
from cli_process import run_cli
from live_service import serve

from eventcore import EventLog, load_settings
from eventcore.testing._plugin import unique_namespace
from eventcore.testing._server import free_port

DEADLINE = 60


async def test_tail_over_sse_follows_until_the_end(event_log: EventLog) -> None:
    async with serve(event_log) as svc:
        sid, token = await svc.create_session()
        env = {"EVENTCORE_TOKEN": token}
        with anyio.fail_after(DEADLINE):
            async with run_cli("tail", sid, "--json", "--url", svc.url, env=env) as cli:
                assert (await cli.envelope())["seq"] == 1
                async with svc.client(token) as c:
                    r = await c.post(f"/v1/sessions/{sid}/inputs", json={"payload": {"n": 1}})
                    assert r.status_code == 200
                assert (await cli.envelope())["payload"] == {"n": 1}
                await event_log.emit(sid, "message", {"text": "x"}, server_data={"s": 1})
                msg = await cli.envelope()
                assert msg["seq"] == 3 and "server_data" not in msg
                await event_log.end_session(sid)
                assert (await cli.envelope())["type"] == "session.ended"
                assert await cli.proc.wait() == 0
        # resuming after the last seq of an ended session: nothing to show, done at once
        with anyio.fail_after(DEADLINE):
            async with run_cli("tail", sid, "--json", "--url", svc.url, "--after", "4",
                               env=env) as cli:
                assert await cli.proc.wait() == 0
                out, _ = await cli.rest()
        assert out == ""


@pytest.mark.parametrize(("which", "needle"), [("bad-token", "401"), ("unknown", "404")])
async def test_tail_over_sse_fails_clearly(event_log: EventLog, which: str, needle: str
                                           ) -> None:
    async with serve(event_log) as svc:
        sid, _ = await svc.create_session()
        if which == "bad-token":
            env = {"EVENTCORE_TOKEN": "nope"}
        else:
            sid, env = "no-such-session", {"EVENTCORE_API_KEY": svc.api_key}
        with anyio.fail_after(DEADLINE):
            async with run_cli("tail", sid, "--url", svc.url, env=env) as cli:
                assert await cli.proc.wait() == 1
                _, err = await cli.rest()
    assert needle in err


async def test_tail_over_sse_resumes_across_a_server_restart(redis_url: str) -> None:
    """The server goes away mid-stream (graceful shutdown: the stream ends with a retry hint),
    events are appended while it is down, and a new server comes up on the same port: the
    tail resumes with Last-Event-ID, with no gap and no duplicate."""
    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             api_key="k" * 32)  # both servers accept the same tokens
    port = free_port()
    async with EventLog(settings) as log, contextlib.AsyncExitStack() as stack:
        with anyio.fail_after(DEADLINE):
            async with serve(log, port=port) as svc:
                sid, token = await svc.create_session()
                for i in range(3):
                    await log.emit(sid, "message", {"n": i})
                cli = await stack.enter_async_context(  # outlives this server
                    run_cli("tail", sid, "--json", "--url", svc.url,
                            env={"EVENTCORE_TOKEN": token}))
                seen = [await cli.envelope() for _ in range(4)]
            # the first server is gone
            for i in range(3, 6):
                await log.emit(sid, "message", {"n": i})
            await cli.wait_stderr("reconnecting")
            async with serve(log, port=port):
                await log.emit(sid, "message", {"n": 6})
                await log.end_session(sid)
                while seen[-1]["type"] != "session.ended":
                    seen.append(await cli.envelope())
                assert await cli.proc.wait() == 0
    assert [e["seq"] for e in seen] == list(range(1, 10))
    assert [e["payload"]["n"] for e in seen if e["type"] == "message"] == list(range(7))


@pytest.mark.parametrize("via", ["redis", "sse"])
async def test_tail_continues_past_history_trimmed_everywhere(
    event_log: EventLog, redis_url: str, via: str
) -> None:
    s = await event_log.create_session("echo")
    for i in range(5):
        await event_log.emit(s.session_id, "message", {"n": i})
    stream = event_log.keys.session(s.session_id).stream
    await event_log.redis.xtrim(stream, minid="0-4", approximate=False)  # 1-3 gone, no archive
    await event_log.end_session(s.session_id)
    async with serve(event_log) as svc:
        if via == "redis":
            args: tuple[str, ...] = ()
            env = {"EVENTCORE_REDIS_URL": redis_url, "EVENTCORE_SHARDS": "4",
                   "EVENTCORE_NAMESPACE": event_log.settings.namespace}
        else:
            args, env = ("--url", svc.url), {"EVENTCORE_API_KEY": svc.api_key}
        with anyio.fail_after(DEADLINE):
            async with run_cli("tail", s.session_id, "--json", *args, env=env) as cli:
                assert await cli.proc.wait() == 0
                out, err = await cli.rest()
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [4, 5, 6, 7]
    assert "history after seq 0 is gone; continuing at seq 4" in err


async def test_tail_over_sse_stops_at_session_deleted_and_never_follows_the_next_session(
    event_log: EventLog,
) -> None:
    """The follower is mid catch-up (it stops taking events after the first of an 8 MiB
    history) when the session is deleted and created again: the stream ends with
    session.deleted, and the follower stops there. Before, it took that for a repeated seq and
    reconnected with Last-Event-ID, into the new session."""
    from eventcore import Envelope
    from eventcore.server._tail import follow_http

    notes: list[tuple[str, str]] = []
    async with serve(event_log) as svc:
        sid, _ = await svc.create_session()
        await event_log.append_many([Envelope(type="note", session_id=sid,
                                              payload={"gen": "old", "x": "x" * 32 * 1024})
                                     for _ in range(256)])
        items = follow_http(svc.url, svc.api_key, sid, 0, lambda k, t: notes.append((k, t)))
        with anyio.fail_after(DEADLINE):
            seqs = [(await items.__anext__()).seq]
            async with svc.client(svc.api_key) as c:
                assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204
            await event_log.create_session("echo", session_id=sid)
            await event_log.append_many([Envelope(type="note", session_id=sid,
                                                  payload={"gen": "new"}) for _ in range(400)])
            async for item in items:
                assert b'"new"' not in item.data, item
                seqs.append(item.seq)
    assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] < 258
    assert ("info", "the session was deleted; its id may name a new session now") in notes
    assert not [n for n in notes if n[0] == "retry"]


async def test_tail_over_sse_follows_a_diverged_stream_and_resumes_in_its_epoch(
    redis_url: str,
) -> None:
    """After a failover lost seqs 8..10 and they were written again, the SSE ids are
    ``<seq>.<epoch>``: tail yields those events (before, it took every such id for a server
    notice and printed nothing), skips nothing, and a reconnect resumes with the full id in the
    new epoch (a bare seq would be generation 0, reset again on every reconnect)."""
    from divergence import lose_tail

    from eventcore import Envelope
    from eventcore.server._tail import Event, follow_http

    settings = load_settings(redis_url=redis_url, namespace=unique_namespace(), shards=4,
                             api_key="k" * 32)  # both servers accept the same key
    port = free_port()
    notes: list[tuple[str, str]] = []
    got: list[Event] = []

    async def take(n: int) -> None:
        while len(got) < n:
            item = await items.__anext__()
            assert isinstance(item, Event), item
            got.append(item)

    async with EventLog(settings) as log:
        async with serve(log, port=port) as svc:
            sid, _ = await svc.create_session()  # seq 1: session.created
            await log.append_many([Envelope(type="note", session_id=sid,
                                            payload={"v": "old", "i": i}) for i in range(9)])
            items = follow_http(svc.url, svc.api_key, sid, 0,
                                lambda k, t: notes.append((k, t)), backoff_cap_s=0.2)
            with anyio.fail_after(DEADLINE):
                await take(10)
                await lose_tail(log, sid, 7)
                await log.append_many([Envelope(type="note", session_id=sid,
                                                payload={"v": "new", "i": i})
                                       for i in range(6)])  # seqs 8..13 again
                await take(16)
        assert [e.seq for e in got] == list(range(1, 11)) + list(range(8, 14))
        assert all(b'"new"' in e.data for e in got[10:])
        rewritten = [t for _, t in notes if "rewritten" in t]
        assert len(rewritten) == 1, notes
        # a new server on the port: tail reconnects with Last-Event-ID `13.<epoch>`
        async with serve(log, port=port):
            await log.emit(sid, "note", {"v": "after-restart"})
            with anyio.fail_after(DEADLINE):
                await take(17)
            await items.aclose()
        assert got[-1].seq == 14 and b"after-restart" in got[-1].data
        assert [t for _, t in notes if "rewritten" in t] == rewritten, notes
