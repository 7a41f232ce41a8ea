"""A Python client of the eventcore HTTP API: :class:`AsyncClient` and the blocking
:class:`Client` (the ``client`` extra: ``pip install 'eventcore[client]'``).

    from eventcore.client import AsyncClient

    async with AsyncClient("http://127.0.0.1:8000", api_key) as client:
        s = await client.create_session("echo", input={"text": "hi"})
        await client.send_input(s.session_id, {"text": "more"})
        async for item in client.events(s.session_id):
            print(item)      # Envelope | HistoryDiverged | HistoryGone | SessionDeleted

The stream resumes by ``Last-Event-ID`` (``<seq>.<epoch>`` once the session's history has
diverged; the stream's ``after``/``epoch`` are its cursor) across dropped connections and
server restarts (no event skipped or repeated), backs off with jitter, and asks the
``refresh_token`` hook for a new credential on ``401`` and when a stream's token expires.
Errors derive from :class:`eventcore.EventcoreError` (:class:`ClientError`). This package
never imports :mod:`eventcore.server`: a client machine needs the core and httpx only.
"""

from __future__ import annotations

from eventcore._extras import require_extra

require_extra("client", "eventcore.client")

from eventcore._envelope import Envelope, decode_payload  # noqa: E402
from eventcore.errors import HistoryDiverged, HistoryGone  # noqa: E402

from ._async import AsyncClient, EventStream, TokenRefresh  # noqa: E402
from ._errors import (  # noqa: E402
    ApiError,
    ClientError,
    Conflict,
    ConnectionLost,
    Forbidden,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
)
from ._sync import BlockingEventStream, Client  # noqa: E402
from ._types import (  # noqa: E402
    Appended,
    CreatedSession,
    EventsPage,
    SessionDeleted,
    SessionState,
    StreamItem,
    Token,
)

__all__ = [
    "ApiError",
    "Appended",
    "AsyncClient",
    "BlockingEventStream",
    "Client",
    "ClientError",
    "Conflict",
    "ConnectionLost",
    "CreatedSession",
    "Envelope",
    "EventStream",
    "EventsPage",
    "Forbidden",
    "HistoryDiverged",
    "HistoryGone",
    "InvalidRequest",
    "NotFound",
    "ServiceUnavailable",
    "SessionDeleted",
    "SessionState",
    "StreamItem",
    "Token",
    "TokenRefresh",
    "Unauthorized",
    "decode_payload",
]
