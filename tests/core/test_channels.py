"""The one pub/sub listener (eventcore._channels) on a single Redis node: one SUBSCRIBE
connection; a restart is told (Lost, then Subscribed) and listening goes on; a reader that
falls behind is told its messages were dropped. (Redis Cluster: tests/cluster.)"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from eventcore import Envelope, EventLog, load_settings
from eventcore._channels import Channels, Lost, Message, Subscribed
from eventcore.testing._server import RedisServer


async def _next_of(listener: Channels, kind: type, within: float = 30) -> object:
    with anyio.fail_after(within):
        async for event in listener:
            if isinstance(event, kind):
                return event
    raise AssertionError("the listener ended")


# asserts the single-node route (one SUBSCRIBE); tests/cluster covers the cluster routes
@pytest.mark.single_node
async def test_messages_of_every_shard_on_one_connection(event_log: EventLog) -> None:
    keys = event_log.keys
    channels = [keys.notify(s) for s in keys.all_shards()]
    async with Channels(event_log.redis, channels) as listener:
        assert listener.connected and len(listener.routes()) == 1
        assert listener.routes()[0][1] == "SUBSCRIBE"
        assert isinstance(await _next_of(listener, Subscribed), Subscribed)
        sid = (await event_log.create_session()).session_id
        res = await event_log.append(Envelope(type="m", session_id=sid))
        want = (keys.notify(keys.shard_of(sid)).encode(), f"{sid} {res.seq}".encode())
        with anyio.fail_after(30):
            while True:
                msg = await _next_of(listener, Message)
                assert isinstance(msg, Message)
                if (msg.channel, msg.data) == want:
                    break


@pytest.mark.redis_restart
async def test_a_restart_is_told_and_listening_goes_on(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    settings = load_settings(redis_url=server.url, namespace="rs", shards=4, retry_budget_s=15)
    async with EventLog(settings) as log:
        sid = (await log.create_session()).session_id
        channel = log.keys.notify(log.keys.shard_of(sid))
        async with Channels(log.redis, [channel], ping_s=1.0) as listener:
            await _next_of(listener, Subscribed)
            await anyio.to_thread.run_sync(server.restart)
            lost = await _next_of(listener, Lost)
            assert isinstance(lost, Lost) and lost.channels == {channel}
            assert isinstance(await _next_of(listener, Subscribed), Subscribed)
            assert listener.connected and listener.subscriptions == 2
            res = await log.append(Envelope(type="m", session_id=sid))
            msg = await _next_of(listener, Message)
            assert isinstance(msg, Message) and msg.data == f"{sid} {res.seq}".encode()


async def test_a_reader_behind_is_told_to_resync(event_log: EventLog) -> None:
    sid = (await event_log.create_session()).session_id
    channel = event_log.keys.notify(event_log.keys.shard_of(sid))
    async with Channels(event_log.redis, [channel], max_pending=5) as listener:
        for _ in range(20):  # nobody reads meanwhile
            await event_log.append(Envelope(type="m", session_id=sid))
        def overflowed() -> list[Subscribed]:
            return [e for e in listener._queue if isinstance(e, Subscribed) and e.overflow]

        with anyio.fail_after(30):
            while not overflowed():  # the listener's queue, filled by its connection
                listener._queued = anyio.Event()  # set by the next item queued
                await listener._queued.wait()
        assert overflowed()[0].channels == {channel}
        assert listener._messages <= 5  # bounded: the older ones were dropped
        assert sum(isinstance(e, Message) for e in listener._queue) == listener._messages


@pytest.mark.redis_restart
async def test_a_silent_server_is_found_out_by_ping(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    settings = load_settings(redis_url=server.url, namespace="ping", shards=1, retry_budget_s=15)
    async with EventLog(settings) as log:
        sid = (await log.create_session()).session_id
        channel = log.keys.notify(0)
        async with Channels(log.redis, [channel], ping_s=0.3) as listener:
            await _next_of(listener, Subscribed)
            # the server answers nothing for 3 s (the connection stays open): the PING sent
            # after 0.3 s of silence gets no PONG within 0.3 s more
            server.command("CLIENT", "PAUSE", "3000")
            lost = await _next_of(listener, Lost)
            assert isinstance(lost, Lost) and "PING" in str(lost.error)
            assert isinstance(await _next_of(listener, Subscribed), Subscribed)
            res = await log.append(Envelope(type="m", session_id=sid))
            msg = await _next_of(listener, Message)
            assert isinstance(msg, Message) and msg.data == f"{sid} {res.seq}".encode()
