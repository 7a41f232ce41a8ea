"""The doorbell of consumer-group reads on Redis Cluster.

On one Redis node a group read is one blocking XREADGROUP over every shard stream. On Redis
Cluster a command names keys of one slot only, so a read is a pipeline of non-blocking
XREADGROUPs per master (:meth:`eventcore._groups.ConsumerGroup.read`), and an idle read would
have to poll. Every script that adds an entry to a shard stream publishes on a channel of the
shard, in the same step (feeds: ``notify`` after each append; dispatch streams:
:meth:`~eventcore._keys.Keys.dispatched` after each dispatch entry): a :class:`Doorbell` hears
those channels through the one pub/sub listener (:mod:`eventcore._channels`: one connection
per master, not per shard) and is rung by each message, so an idle read waits for it instead
of polling, with a safety poll at a long interval.

Pub/sub is at most once (a reconnect, a failover, a slow reader drop messages): every
(re)subscription and every lost connection rings the bell too, and while any of its channels
is not subscribed (:attr:`Doorbell.live` false) a read polls fast as without a doorbell.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
from anyio.abc import TaskStatus

from ._channels import ChannelEvent, Channels, Lost, Message, Subscribed
from ._redis import Redis

__all__ = ["Doorbell"]


class Doorbell:
    """Rung whenever something may have been added to a shard's stream: ``channels`` maps
    each shard to the channel of its notifications (on ``redis``, a cluster client).

    A caller that runs a :class:`~eventcore._channels.Channels` listener of its own passes
    every event to :meth:`hear` (with :attr:`channels` among the listener's); otherwise
    :meth:`listen` runs one."""

    def __init__(self, redis: Redis, channels: Mapping[int, str]) -> None:
        self.redis = redis
        self.channels = tuple(dict.fromkeys(channels.values()))
        self._shards_of: dict[bytes, list[int]] = {}
        for shard, channel in channels.items():
            self._shards_of.setdefault(channel.encode(), []).append(shard)
        self._mine = frozenset(self.channels)
        #: times rung: a reader takes it before looking, and waits only if it is unchanged
        self.rings = 0
        self._rang: dict[int, int] = {}  # shard -> :attr:`rings` at its last message
        self._everything = 0  # :attr:`rings` at the last ring of every shard
        #: readers waiting now (for tests and metrics)
        self.waiting = 0
        self._live: set[str] = set()
        self._event: anyio.Event | None = None

    @property
    def live(self) -> bool:
        """Every channel is subscribed: a ring can be waited for."""
        return len(self._live) == len(self.channels)

    def ring(self, shards: list[int] | None = None) -> None:
        """Something may be new on ``shards`` (None: on any)."""
        self.rings += 1
        if shards is None:
            self._everything = self.rings
        else:
            for shard in shards:
                self._rang[shard] = self.rings
        if self._event is not None:
            self._event.set()
            self._event = None

    def since(self, seen: int) -> set[int] | None:
        """The shards rung after ``seen`` (a value of :attr:`rings`); None: any may have
        something new (a subscription, a loss)."""
        if self._everything > seen:
            return None
        return {shard for shard, at in self._rang.items() if at > seen}

    def silence(self) -> None:
        """The listener stopped: nobody rings the bell now, reads poll fast again."""
        self._live.clear()
        self.ring()

    def hear(self, event: ChannelEvent) -> bool:
        """Take one event of a listener: a message on one of the bell's channels rings it
        (returns True: the event was the bell's); a subscription or a loss of any of them
        rings it too (returns False: the listener's owner may want it as well)."""
        if type(event) is Message:
            shards = self._shards_of.get(event.channel)
            if shards is not None:
                self.ring(shards)
                return True
            return False
        if type(event) is Subscribed:
            mine = event.channels & self._mine
            if mine:
                # messages may have been lost before: whoever waits looks again
                self._live.update(mine)
                self.ring()
        elif type(event) is Lost:
            mine = event.channels & self._mine
            if mine:
                # not live: a waiting read goes back to the fast poll until subscribed again
                self._live.difference_update(mine)
                self.ring()
        return False

    async def wait(self, seen: int, at_most_s: float) -> None:
        """Return once rung after ``seen`` (a value of :attr:`rings` taken before the reader
        last looked: a ring meanwhile returns at once), or after ``at_most_s`` seconds."""
        if self.rings != seen:
            return
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        self.waiting += 1
        try:
            with anyio.move_on_after(at_most_s):
                await event.wait()
        finally:
            self.waiting -= 1

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                     ) -> None:
        """Run a listener of the bell's channels (until cancelled); started once every one is
        subscribed."""
        try:
            async with Channels(self.redis, self.channels) as listener:
                task_status.started()
                async for event in listener:
                    self.hear(event)
        finally:
            self.silence()
