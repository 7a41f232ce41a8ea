"""The asynchronous client of the /v1 API (httpx)."""

from __future__ import annotations

import inspect
import json
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import anyio
import httpx
import msgspec

from eventcore._envelope import Envelope
from eventcore.errors import HistoryGone

from ._errors import ApiError, ConnectionLost, api_error
from ._sse import SseParser
from ._types import (
    Appended,
    CreatedSession,
    EventsPage,
    SessionDeleted,
    SessionState,
    StreamItem,
    Token,
    _WirePage,
    diverged,
    page_of,
)

__all__ = ["AsyncClient", "EventStream", "TokenRefresh"]

TokenRefresh = Callable[[], "str | Awaitable[str]"]
"""Called for a fresh credential on ``401`` and when a stream's token expires."""

_T = TypeVar("_T")
_RETRY_STATUS = frozenset({429, 502, 503, 504})
_CONTROL = frozenset({"server.shutdown", "token.expired", "session.deleted", "stream.reset"})
_ENVELOPE = msgspec.json.Decoder(Envelope)


def _path(session_id: str, tail: str = "") -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}{tail}"


def _retry_after(r: httpx.Response) -> float | None:
    raw = r.headers.get("retry-after", "")
    return float(raw) if raw.isdigit() else None


class AsyncClient:
    """A client of an eventcore service.

    ``token`` is the API key (every session, admin endpoints) or a session token (its own
    session). ``refresh_token`` (sync or async, no arguments) is called for a new credential
    when an answer is ``401`` and when a stream's token expires; the request is then repeated
    once with what it returns. Requests that could not reach the service, and ``429``/``5xx``
    answers, are retried with exponential backoff and jitter (``Retry-After`` honoured) until
    ``reconnect_timeout_s`` has passed; then :class:`ConnectionLost` (or the typed
    :class:`ApiError`) is raised. Inputs always carry an idempotency key (made up when not
    given), so a retried input is appended once.

    Use it as ``async with AsyncClient(url, key) as client: ...``.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        refresh_token: TokenRefresh | None = None,
        timeout_s: float = 30.0,
        stream_read_timeout_s: float = 60.0,
        reconnect_timeout_s: float = 120.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.token = token
        self.refresh_token = refresh_token
        self.reconnect_timeout_s = reconnect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._stream_timeout = httpx.Timeout(timeout_s, read=stream_read_timeout_s)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                       transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra or {})
        return headers

    async def _refresh(self) -> bool:
        if self.refresh_token is None:
            return False
        got = self.refresh_token()
        self.token = await got if inspect.isawaitable(got) else got
        return True

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** min(attempt, 16))
        return ceiling * random.uniform(0.5, 1.0)

    async def _request(self, method: str, path: str, *, body: Any = None,
                       params: Mapping[str, Any] | None = None, idempotent: bool = True
                       ) -> Any:
        """The JSON answer (``None`` for 204). A request that may have reached the service is
        repeated only when ``idempotent``; one refused at connect always may be."""
        deadline = time.monotonic() + self.reconnect_timeout_s
        attempt, refreshed = 0, False
        while True:
            try:
                r = await self._http.request(method, path, json=body, params=params,
                                             headers=self._headers())
            except httpx.TransportError as exc:
                sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if (sent and not idempotent) or time.monotonic() >= deadline:
                    raise ConnectionLost(f"{method} {path}: {exc!r}") from exc
                await anyio.sleep(self._backoff(attempt))
                attempt += 1
                continue
            if r.status_code == 401 and not refreshed and await self._refresh():
                refreshed = True
                continue
            if r.status_code in _RETRY_STATUS and time.monotonic() < deadline:
                await anyio.sleep(_retry_after(r) or self._backoff(attempt))
                attempt += 1
                continue
            if r.status_code >= 400:
                raise _error(r)
            if r.status_code == 204 or not r.content:
                return None
            return r.json()

    # -- sessions ------------------------------------------------------------------------------

    async def create_session(
        self, agent: str, *, input: Any = None, metadata: Mapping[str, str] | None = None,
        ttl_s: int | None = None, idempotency_key: str | None = None,
    ) -> CreatedSession:
        """Create a session (needs the API key). With an ``idempotency_key`` (one is made up
        when not given, so a retry creates nothing twice) the same key returns the same
        session while it exists."""
        body: dict[str, Any] = {"agent": agent,
                                "idempotency_key": idempotency_key or uuid.uuid4().hex}
        if input is not None:
            body["input"] = input
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return _convert(await self._request("POST", "/v1/sessions", body=body), CreatedSession)

    async def get_session(self, session_id: str) -> SessionState:
        """The session's state, metadata and projection."""
        return _convert(await self._request("GET", _path(session_id)), SessionState)

    async def list_sessions(self, **filters: Any) -> dict[str, Any]:
        """``GET /v1/sessions`` (admin): one page as the service answers it,
        ``{"sessions": [...], "next_cursor": ...}``. ``filters`` become query parameters
        (``agent=``, ``state=``, ``label=``, ``cursor=``, ``limit=`` ...); a list value is
        repeated (``label=["a=1", "b=2"]``), ``None`` values are left out."""
        params: list[tuple[str, str | int | float | bool | None]] = []
        for k, v in filters.items():
            for item in (v if isinstance(v, list | tuple) else [v]):
                if item is not None:
                    params.append((k, str(item).lower() if isinstance(item, bool) else str(item)))
        page = await self._request("GET", "/v1/sessions", params=httpx.QueryParams(params))
        if not isinstance(page, dict):
            raise ApiError(200, "unexpected-answer", f"not a page: {page!r}"[:300])
        return page

    async def delete_session(self, session_id: str) -> None:
        """End and delete the session."""
        await self._request("DELETE", _path(session_id))

    async def send_input(self, session_id: str, payload: Any, *,
                         idempotency_key: str | None = None) -> Appended:
        """Append an input. A repeated ``idempotency_key`` returns the first input's seq
        (``duplicate=True``) and appends nothing; one is made up when not given, so the
        client's own retries never append twice."""
        body = {"payload": payload, "idempotency_key": idempotency_key or uuid.uuid4().hex}
        return _convert(await self._request("POST", _path(session_id, "/inputs"), body=body),
                        Appended)

    async def send_signal(self, session_id: str, key: str, value: Any = None) -> Appended:
        """Emit a signal (the latest value per ``key`` is what readers keep, so a retried
        signal changes nothing they see)."""
        return _convert(await self._request("POST", _path(session_id, "/signals"),
                                            body={"key": key, "value": value}), Appended)

    async def signals(self, session_id: str, *, since_seq: int = 0,
                      keys: Iterable[str] | None = None) -> list[Envelope]:
        """Every signal after ``since_seq`` in seq order (optionally only ``keys``)."""
        params: dict[str, Any] = {"since_seq": since_seq}
        if keys is not None:
            params["keys"] = ",".join(keys)
        got = await self._request("GET", _path(session_id, "/signals"), params=params)
        return _convert(got, dict[str, list[Envelope]])["signals"]

    async def cancel(self, session_id: str, *, run_id: str | None = None,
                     reason: str | None = None) -> Appended:
        """Ask the session's host to cancel a run (or its current work)."""
        body = {k: v for k, v in {"run_id": run_id, "reason": reason}.items() if v is not None}
        return _convert(await self._request("POST", _path(session_id, "/cancel"), body=body,
                                            idempotent=False), Appended)

    async def get_token(self, session_id: str, *, scope: str = "read",
                        ttl_s: int = 300) -> Token:
        """Mint a session token (``read`` or ``rw``); never outlives the caller's own."""
        return _convert(await self._request("POST", _path(session_id, "/tokens"),
                                            body={"scope": scope, "ttl_s": ttl_s}), Token)

    async def history(self, session_id: str, *, after: int = 0, epoch: str = "0",
                      limit: int = 100, types: Iterable[str] | None = None) -> EventsPage:
        """One JSON page of envelopes after ``after`` (of the stream epoch ``epoch``, as the
        previous page said; see :class:`EventsPage` for its ``reset``)."""
        params: dict[str, Any] = {"format": "json", "after": after, "limit": limit}
        if epoch and epoch != "0":
            params["epoch"] = epoch
        if types is not None:
            params["types"] = ",".join(types)
        wire = _convert(await self._request("GET", _path(session_id, "/events"),
                                            params=params), _WirePage)
        return page_of(session_id, wire)

    # -- the stream ----------------------------------------------------------------------------

    def events(self, session_id: str, *, after: int = 0, epoch: str = "0",
               types: Iterable[str] | None = None) -> EventStream:
        """Follow the session from seq ``after + 1``: every envelope once, in seq order, of
        every type (or only ``types``), until ``session.ended`` (yielded, then the iteration
        ends) or the session's deletion (a :class:`SessionDeleted` item, then it ends).

        ``epoch`` is the stream epoch of ``after``, as a previous stream's
        :attr:`EventStream.epoch` (or a JSON page's ``epoch``) said: a saved cursor is the pair
        ``(stream.after, stream.epoch)``. ``"0"`` (the default) is the epoch of every session
        whose history never diverged.

        Dropped connections, a restarting server (``server.shutdown`` and its ``retry:``
        hint), ``429``/``5xx`` answers and an expired stream token (``token.expired``, then
        the refresh hook) are resumed with ``Last-Event-ID`` (the full id, ``<seq>.<epoch>``
        once the epoch is not 0): nothing is skipped or repeated. Where the history after the
        cursor may have been rewritten (a failover lost acknowledged appends) or the cursor is
        beyond the tail, one :class:`~eventcore.errors.HistoryDiverged` is yielded: discard
        what you hold after its ``resume_after``; the stream goes on from there in its
        ``epoch``. Where history after the cursor is gone everywhere a
        :class:`~eventcore.errors.HistoryGone` item is yielded and the stream goes on after
        its ``resume_after``. :class:`ConnectionLost` once the service has been unreachable
        for ``reconnect_timeout_s``."""
        return EventStream(self, session_id, after=after, epoch=epoch, types=types)

    async def _follow(self, stream: _Cursor, types: Iterable[str] | None
                      ) -> AsyncGenerator[StreamItem, None]:
        """The loop of :meth:`events`; ``stream.after``/``stream.epoch`` are its cursor, moved
        before each item is handed out (a saved cursor then covers what was received)."""
        session_id = stream.session_id
        wanted = ",".join(types) if types is not None else None
        attempt, refreshed = 0, False
        down_since: float | None = None
        while True:
            delay: float | None = None
            failure: BaseException | None = None
            cursor = stream.after
            headers = self._headers({"Accept": "text/event-stream", "Cache-Control": "no-store"})
            if cursor or stream.epoch != "0":
                headers["Last-Event-ID"] = stream.last_event_id
            params: dict[str, Any] = {"after": cursor}
            if stream.epoch != "0":
                params["epoch"] = stream.epoch
            if wanted:
                params["types"] = wanted
            try:
                async with self._http.stream("GET", _path(session_id, "/events"), params=params,
                                             headers=headers, timeout=self._stream_timeout) as r:
                    if r.status_code == 204:  # ended, and we have seen all of it
                        return
                    if r.status_code == 401 and not refreshed and await self._refresh():
                        refreshed = True
                        continue
                    if r.status_code in _RETRY_STATUS:
                        await r.aread()
                        delay = _retry_after(r)
                        failure = _error(r)
                    elif r.status_code >= 400:
                        await r.aread()
                        raise _error(r)
                    else:
                        attempt, refreshed, down_since = 0, False, None
                        parser = SseParser()
                        async for line in r.aiter_lines():
                            ev = parser.feed(line)
                            if ev is None:
                                continue
                            if ev.event not in _CONTROL:
                                env = _ENVELOPE.decode(ev.data)
                                if env.seq <= stream.after:
                                    continue  # never twice
                                # the id is `<seq>` (epoch 0) or `<seq>.<epoch>`: an epoch may
                                # also change with no reset (the cursor was in the kept prefix)
                                stream.after = env.seq
                                stream.epoch = (ev.id or "").partition(".")[2] or "0"
                                yield env
                                if env.type == "session.ended":
                                    return
                                continue
                            data = json.loads(ev.data) if ev.data else {}
                            if ev.event == "stream.reset":
                                if data.get("reason") == "diverged":
                                    reset = diverged(session_id, data)
                                    # back to where the histories agree, in the new epoch
                                    stream.after, stream.epoch = reset.resume_after, reset.epoch
                                    yield reset
                                    continue
                                gone = HistoryGone(session_id, int(data["after"]),
                                                   int(data["first_available"]))
                                stream.after = max(stream.after, gone.resume_after)
                                yield gone
                            elif ev.event == "session.deleted":
                                yield SessionDeleted(
                                    session_id=session_id,
                                    last_seq=int(data.get("last_seq", stream.after)),
                                    incarnation=str(data.get("incarnation", "")))
                                return
                            elif ev.event == "server.shutdown":
                                delay = float(data.get("retry_ms", ev.retry_ms or 1000)) / 1000
                            elif ev.event == "token.expired":
                                await self._refresh()
                                refreshed, delay = True, 0.0
                        if delay is None:
                            # the server ended the stream without saying why: done if ended
                            state = await self.get_session(session_id)
                            if state.state == "ended" and state.last_seq <= stream.after:
                                return  # (else: backoff, so a closing server is no hot loop)
            except httpx.TransportError as exc:
                failure = exc
            if failure is not None:
                now = time.monotonic()
                down_since = down_since if down_since is not None else now
                if now - down_since >= self.reconnect_timeout_s:
                    if isinstance(failure, ApiError):
                        raise failure
                    raise ConnectionLost(f"stream of {session_id!r} after "
                                         f"{stream.last_event_id}: {failure!r}") from failure
            if delay is None:
                delay = self._backoff(attempt)
                attempt += 1
            await anyio.sleep(delay)


class _Cursor:
    """A stream's position, which its loop moves. Apart from :class:`EventStream` so the
    loop holds no reference back to it: a stream left unclosed is then freed (and closed) as
    soon as it is dropped, as a bare generator would be."""

    __slots__ = ("after", "epoch", "session_id")

    def __init__(self, session_id: str, after: int, epoch: str) -> None:
        self.session_id, self.after, self.epoch = session_id, after, epoch

    @property
    def last_event_id(self) -> str:
        return f"{self.after}.{self.epoch}" if self.epoch != "0" else str(self.after)


class EventStream:
    """What :meth:`AsyncClient.events` returns: an async iterator of :data:`StreamItem`
    that knows its cursor. :attr:`after` and :attr:`epoch` are where it stands (the last item
    handed out); save both to resume later with ``client.events(sid, after=..., epoch=...)``.
    Leaving the loop early closes the stream at garbage collection; :meth:`aclose` (or
    ``async with``) closes it at once."""

    def __init__(self, client: AsyncClient, session_id: str, *, after: int = 0,
                 epoch: str = "0", types: Iterable[str] | None = None) -> None:
        self._cursor = _Cursor(session_id, after, epoch or "0")
        self._items = client._follow(self._cursor, list(types) if types is not None else None)

    @property
    def session_id(self) -> str:
        return self._cursor.session_id

    @property
    def after(self) -> int:
        """The seq of the last envelope handed out (of a reset: its ``resume_after``)."""
        return self._cursor.after

    @property
    def epoch(self) -> str:
        """The stream epoch of :attr:`after`: ``"0"`` until the session's history diverged,
        then the 16-digit generation its ids and resets carry."""
        return self._cursor.epoch

    @property
    def last_event_id(self) -> str:
        """The SSE id of the cursor, as the stream resumes with it: ``<after>`` in epoch 0,
        else ``<after>.<epoch>``."""
        return self._cursor.last_event_id

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamItem:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        """Close the stream (its connection back to the pool)."""
        await self._items.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def _error(r: httpx.Response) -> ApiError:
    try:
        body = r.json()
    except ValueError:
        body = None
    return api_error(r.status_code, body, r.reason_phrase)


def _convert(value: Any, kind: type[_T]) -> _T:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise ApiError(200, "unexpected-answer", f"{exc}: {value!r}"[:500]) from exc
