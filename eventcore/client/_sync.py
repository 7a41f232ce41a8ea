"""The blocking client: :class:`AsyncClient` driven through an anyio blocking portal."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from anyio.from_thread import BlockingPortal, start_blocking_portal

from eventcore._envelope import Envelope

from ._async import AsyncClient, EventStream, TokenRefresh
from ._types import Appended, CreatedSession, EventsPage, SessionState, StreamItem, Token

__all__ = ["BlockingEventStream", "Client"]


class Client:
    """The same client for synchronous code: every method of :class:`AsyncClient`, blocking;
    :meth:`events` is a plain iterator. It runs an event loop in a thread of its own; use it
    as ``with Client(url, key) as client: ...`` (or call :meth:`close`)."""

    def __init__(self, base_url: str, token: str | None = None, *,
                 refresh_token: TokenRefresh | None = None, **options: Any) -> None:
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        try:
            self._async = self._portal.call(self._make, base_url, token, refresh_token, options)
        except BaseException:
            self._stack.close()
            raise

    @staticmethod
    async def _make(base_url: str, token: str | None, refresh: TokenRefresh | None,
                    options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(base_url, token, refresh_token=refresh, **options)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the client's thread."""
        try:
            self._portal.call(self._async.aclose)
        finally:
            self._stack.close()

    @property
    def token(self) -> str | None:
        """The credential in use (the refresh hook replaces it)."""
        token: str | None = self._async.token
        return token

    def create_session(self, agent: str, *, input: Any = None,
                       metadata: Mapping[str, str] | None = None, ttl_s: int | None = None,
                       idempotency_key: str | None = None) -> CreatedSession:
        """See :meth:`AsyncClient.create_session`."""
        out: CreatedSession = self._portal.call(lambda: self._async.create_session(
            agent, input=input, metadata=metadata, ttl_s=ttl_s, idempotency_key=idempotency_key))
        return out

    def get_session(self, session_id: str) -> SessionState:
        """See :meth:`AsyncClient.get_session`."""
        out: SessionState = self._portal.call(self._async.get_session, session_id)
        return out

    def list_sessions(self, **filters: Any) -> dict[str, Any]:
        """See :meth:`AsyncClient.list_sessions`."""
        return self._portal.call(lambda: self._async.list_sessions(**filters))

    def delete_session(self, session_id: str) -> None:
        """See :meth:`AsyncClient.delete_session`."""
        self._portal.call(self._async.delete_session, session_id)

    def send_input(self, session_id: str, payload: Any, *,
                   idempotency_key: str | None = None) -> Appended:
        """See :meth:`AsyncClient.send_input`."""
        out: Appended = self._portal.call(lambda: self._async.send_input(
            session_id, payload, idempotency_key=idempotency_key))
        return out

    def send_signal(self, session_id: str, key: str, value: Any = None) -> Appended:
        """See :meth:`AsyncClient.send_signal`."""
        out: Appended = self._portal.call(self._async.send_signal, session_id, key, value)
        return out

    def signals(self, session_id: str, *, since_seq: int = 0,
                keys: Iterable[str] | None = None) -> list[Envelope]:
        """See :meth:`AsyncClient.signals`."""
        return self._portal.call(lambda: self._async.signals(session_id, since_seq=since_seq,
                                                             keys=keys))

    def cancel(self, session_id: str, *, run_id: str | None = None,
               reason: str | None = None) -> Appended:
        """See :meth:`AsyncClient.cancel`."""
        out: Appended = self._portal.call(lambda: self._async.cancel(session_id, run_id=run_id,
                                                            reason=reason))
        return out

    def get_token(self, session_id: str, *, scope: str = "read", ttl_s: int = 300) -> Token:
        """See :meth:`AsyncClient.get_token`."""
        out: Token = self._portal.call(lambda: self._async.get_token(session_id, scope=scope,
                                                               ttl_s=ttl_s))
        return out

    def history(self, session_id: str, *, after: int = 0, epoch: str = "0", limit: int = 100,
                types: Iterable[str] | None = None) -> EventsPage:
        """See :meth:`AsyncClient.history`."""
        out: EventsPage = self._portal.call(lambda: self._async.history(
            session_id, after=after, epoch=epoch, limit=limit, types=types))
        return out

    def events(self, session_id: str, *, after: int = 0, epoch: str = "0",
               types: Iterable[str] | None = None) -> BlockingEventStream:
        """See :meth:`AsyncClient.events`: the same items, from a blocking iterator with the
        same ``after``/``epoch`` cursor. Leaving the loop early closes the stream."""
        return BlockingEventStream(self._portal, self._async.events(
            session_id, after=after, epoch=epoch, types=types))


class BlockingEventStream:
    """What :meth:`Client.events` returns: an iterator of :data:`StreamItem`; :attr:`after`
    and :attr:`epoch` are its cursor (see :class:`EventStream`). :meth:`close` (or ``with``)
    closes the stream at once; a stream dropped without it is closed when collected."""

    def __init__(self, portal: BlockingPortal, stream: EventStream) -> None:
        self._stream = stream
        # not a method of self: the generator then holds no reference back to this object,
        # which is freed (closing the stream) as soon as a loop that broke out drops it
        self._items = _drive(portal, stream)

    @property
    def session_id(self) -> str:
        return self._stream.session_id

    @property
    def after(self) -> int:
        """The seq of the last envelope handed out (of a reset: its ``resume_after``)."""
        return self._stream.after

    @property
    def epoch(self) -> str:
        """The stream epoch of :attr:`after` (``"0"`` until the history diverged)."""
        return self._stream.epoch

    @property
    def last_event_id(self) -> str:
        """``<after>`` or ``<after>.<epoch>``: the id the stream resumes with."""
        return self._stream.last_event_id

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> StreamItem:
        return next(self._items)

    def close(self) -> None:
        """Close the stream (its connection back to the pool)."""
        self._items.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _drive(portal: BlockingPortal, stream: EventStream) -> Generator[StreamItem, None, None]:
    try:
        while True:
            try:
                yield portal.call(stream.__anext__)
            except StopAsyncIteration:
                return
    finally:
        portal.call(stream.aclose)
