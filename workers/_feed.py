"""The worker's reader: every hosted session's stream over a few connections.

No connection or blocking read per session. One pub/sub listener (:mod:`eventcore._channels`:
one connection, or one per master on Redis Cluster) receives the append script's
``"<session> <seq>"`` wake-ups for all shards (sent for appends made without a host
epoch: inputs, signals, control and ends from outside; a host never hears of its own writes,
whose seqs it learns from their replies); a session whose seq moved past its
read cursor is marked dirty, and one fetch loop reads the dirty sessions' new entries with
pipelined XRANGEs (hundreds of sessions per round trip). Pub/sub may drop messages (a
reconnect, a slow client), so after every (re)subscription all sessions are re-checked, and a
slow poll compares each session's seq with its cursor as a safety net. That comparison, made
at once after every (re)subscription, also notices a session whose seq went back below the
host's cursor: Redis restarted without its latest writes (fsync everysec, an older snapshot, a
failover to a lagging replica), so new inputs get seqs the host believes it has read. Such a
hosting saw history that is gone: it is handed back, and hosted again from the log as it is.

On Redis Cluster the same listener hears the dispatch channels for the worker's dispatch read
(:attr:`Feed.bell`, the group's :class:`~eventcore._doorbell.Doorbell`): one connection per
master for both.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus

from eventcore import Envelope, EventLog
from eventcore._channels import Channels, Lost, Message, Subscribed
from eventcore._codec import decode_entry, entry_type
from eventcore._doorbell import Doorbell
from eventcore._layout import META_SEQ
from eventcore._redis import redis_errors
from eventcore.errors import EventcoreError

from ._session import RUN_TERMINAL, Session

__all__ = ["Feed"]

log = logging.getLogger("workers")

# The types a host acts on; everything else only moves the cursor (and is never decoded).
WANTED = frozenset({"input", "control.cancel", "session.ended"}) | RUN_TERMINAL
_FETCH_BATCH = 256
_PAGE = 500
# notifications of sessions not hosted here, remembered for a claim racing them (FIFO bound)
_RECENT = 4096

Items = list[tuple[int, str, Envelope | None]]


class Feed:
    def __init__(
        self,
        log_: EventLog,
        hosts: Mapping[str, Session],
        *,
        poll_interval_s: float,
        on_failure: Callable[[str, BaseException], None],
        on_success: Callable[[str], None],
        on_rewound: Callable[[list[Session]], Awaitable[None]],
    ) -> None:
        self._log = log_
        self._hosts = hosts
        self._poll_interval_s = poll_interval_s
        self._on_failure = on_failure
        self._on_success = on_success
        self._on_rewound = on_rewound
        self._dirty: dict[Session, None] = {}
        self._wake = anyio.Event()
        self._check_now = anyio.Event()
        self._recent: dict[str, int] = {}
        self.fetches = 0
        #: the dispatch read's doorbell, rung by this listener (set before :meth:`run`)
        self.bell: Doorbell | None = None

    def mark(self, s: Session, seq: int | None = None) -> None:
        """The session has entries past its cursor: up to ``seq`` (a notification), or
        unknown (``None``: read whatever there is)."""
        if seq is None:
            s.refetch = True
        elif seq > s.known:
            s.known = seq
        if not s.fetching:
            self._dirty[s] = None
            self._wake.set()

    def adopt(self, s: Session, seq: int) -> None:
        """A brand-new session, claimed when its stream held only ``session.created`` at
        ``seq`` 1 (read atomically with the claim): nothing there for the host, so its history
        is not read. An append that landed after the claim but was notified before the
        session was hosted here is remembered, and read."""
        s.deliver([(seq, "session.created", None)])
        later = self._recent.pop(s.id, 0)
        if later > s.cursor:
            self.mark(s, later)

    def mark_all(self) -> None:
        for s in list(self._hosts.values()):
            self.mark(s)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self._listen)
            tg.start_soon(self._fetch_loop)
            tg.start_soon(self._poll_loop)
            task_status.started()

    # -- notifications ---------------------------------------------------------------------
    async def _listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        keys = self._log.keys
        channels = [keys.wake(shard) for shard in keys.all_shards()]
        bell = self.bell
        if bell is not None:
            channels += bell.channels
        try:
            async with Channels(self._log.redis, channels) as listener:
                task_status.started()
                async for event in listener:
                    if bell is not None and bell.hear(event):
                        continue
                    if type(event) is Message:
                        self._notified(event.data)
                    elif type(event) is Subscribed:
                        # first subscription, or subscribed again: messages may have been
                        # missed
                        self.mark_all()
                        self._check_now.set()  # (a restart may have lost history)
                        if listener.connected:
                            self._on_success("feed")
                    elif type(event) is Lost:
                        self._on_failure("feed", event.error)
        finally:
            if bell is not None:
                bell.silence()

    def _notified(self, data: Any) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        sid, _, seq = text.rpartition(" ")
        if not (seq.isascii() and seq.isdigit()):  # not a note (anything else published there)
            return
        s = self._hosts.get(sid)
        if s is None:
            recent = self._recent
            recent[sid] = max(int(seq), recent.pop(sid, 0))
            if len(recent) > _RECENT:
                del recent[next(iter(recent))]
        elif int(seq) > s.cursor:
            self.mark(s, int(seq))

    async def _poll_loop(self) -> None:
        while True:
            with anyio.move_on_after(self._poll_interval_s):
                await self._check_now.wait()
            self._check_now = anyio.Event()
            try:
                await self._check_seqs()
            except EventcoreError as exc:
                self._on_failure("feed", exc)

    async def _check_seqs(self) -> None:
        """Every hosted session's seq against its read cursor: past it, read (a notification
        was lost); below the cursor as it was when we asked, the stream went back."""
        sessions = list(self._hosts.values())
        rewound: list[Session] = []
        for start in range(0, len(sessions), 1000):
            chunk = sessions[start:start + 1000]
            # (what was read or written before asking is in Redis unless Redis lost it)
            cursors = [s.cursor for s in chunk]
            with redis_errors("poll"):
                async with self._log.redis.pipeline(transaction=False) as pipe:
                    for s in chunk:
                        pipe.hget(self._log.keys.session(s.id).meta, META_SEQ)
                    seqs = await pipe.execute()
            for s, cursor, seq in zip(chunk, cursors, seqs, strict=True):
                if seq is None or self._hosts.get(s.id) is not s:
                    continue
                if int(seq) < cursor:
                    rewound.append(s)
                elif int(seq) > s.cursor:
                    self.mark(s, int(seq))
        if rewound:
            await self._on_rewound(rewound)

    # -- reading ---------------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            # Most notifications are of the sessions' own appends, whose replies arrive on
            # another connection at about the same time: let them land and move the cursors,
            # then read only what is still unknown.
            await anyio.lowlevel.checkpoint()
            while self._dirty:
                batch = []
                for s in list(self._dirty):
                    del self._dirty[s]
                    if (s.refetch or s.known > s.cursor) and not s.defer_read():
                        batch.append(s)
                        if len(batch) == _FETCH_BATCH:
                            break
                if not batch:
                    break
                for s in batch:
                    s.fetching = True
                    s.refetch = False
                try:
                    await self._fetch(batch)
                    self._on_success("feed")
                except EventcoreError as exc:
                    self._on_failure("feed", exc)
                    for s in batch:
                        s.refetch = True
                    await anyio.sleep(0.1)
                finally:
                    for s in batch:
                        s.fetching = False
                        if (s.refetch or s.known > s.cursor) and self._hosts.get(s.id) is s:
                            self._dirty[s] = None

    async def _fetch(self, batch: Sequence[Session]) -> None:
        keys = self._log.keys
        cursors = [s.cursor for s in batch]
        with redis_errors("fetch"):
            async with self._log.redis.pipeline(transaction=False) as pipe:
                for s, cur in zip(batch, cursors, strict=True):
                    pipe.xrange(keys.session(s.id).stream, f"(0-{cur}", "+", count=_PAGE)
                pages = await pipe.execute()
        self.fetches += 1
        refs: list[Envelope] = []
        parsed: list[Items | None] = []
        for s, cur, entries in zip(batch, cursors, pages, strict=True):
            if entries and _seq(entries[0][0]) != cur + 1:
                parsed.append(None)  # a gap: trimmed history, read through the archive
                continue
            items: Items = []
            for entry_id, fields in entries:
                typ = entry_type(fields)
                env = None
                if typ in WANTED:
                    env = decode_entry(fields, where=f"{s.id} {entry_id!r}")
                    if env.payload_ref:
                        refs.append(env)
                items.append((_seq(entry_id), typ, env))
            if len(entries) == _PAGE:
                s.refetch = True
            parsed.append(items)
        hydrated: dict[int, Envelope] = {}
        if refs:
            done = await self._log.hydrate(refs)
            hydrated = {id(a): b for a, b in zip(refs, done, strict=True)}
        for s, cur, got in zip(batch, cursors, parsed, strict=True):
            if self._hosts.get(s.id) is not s:
                continue
            if got is None:
                got = await self._read_archived(s, cur)
            elif hydrated:
                got = [(q, t, hydrated.get(id(e), e) if e is not None else None)
                       for q, t, e in got]
            s.deliver(got)

    async def _read_archived(self, s: Session, after: int) -> Items:
        page = await self._log.read(s.id, after, _PAGE)
        if len(page) == _PAGE:
            s.refetch = True
        return [(e.seq, e.type, e if e.type in WANTED else None) for e in page]


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2])
