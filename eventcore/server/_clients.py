"""Following a session for one transport client, and taking its inputs: shared by SSE,
WebRTC data channels and WebSockets (and the telephony media streams, which are WebSockets).

:class:`ClientFollow` is the one place a transport follows a session for a client: it
subscribes on the process's :class:`~eventcore._follow.Followers` (the hub in an API process:
its bounded buffers, its slow-client rule, its exact seam), iterates the follower's batches and
turns how the follow ended into one last :class:`StreamEnd` item, so each transport only
formats. The transport moves :attr:`ClientFollow.sent` once its client has been handed an item:
that is where every "resume after" notice points.

:func:`client_input` is the one path a transport's client input takes into the log: the same
appends as ``POST /v1/sessions/{id}/inputs`` and ``/signals`` (the same event key for an
idempotency key, so a retry over any transport dedupes against the others), after checking
that the session is still the incarnation the client was authorized for.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from eventcore._envelope import Envelope
from eventcore._follow import Event, Follower, Followers, closing_iter
from eventcore._log import EventLog
from eventcore._values import validate_value
from eventcore.errors import (
    EventcoreError,
    HistoryDiverged,
    HistoryGone,
    HubClosed,
    PayloadTooLarge,
    SessionEnded,
    SessionNotFound,
    ValidationError,
)

__all__ = ["ClientFollow", "InputOutcome", "StreamEnd", "client_input", "diverged_fields",
           "is_generation", "parse_epoch"]

logger = logging.getLogger("eventcore.server")

EndReason = Literal["ended", "shutdown", "deleted", "error"]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a follow: ``ended`` (after ``session.ended``), ``shutdown`` (the
    server is draining: resume elsewhere after ``last_seq``), ``deleted`` (the incarnation
    followed is gone: not resumable) or ``error`` (``error``: Redis gone past the retry
    budget, ...). ``last_seq`` is :attr:`ClientFollow.sent` when the follow ended."""

    reason: EndReason
    last_seq: int
    incarnation: str
    error: EventcoreError | None = None


ClientItem = list[Event] | HistoryGone | StreamEnd


def is_generation(text: str) -> bool:
    """A stream generation as the server issues them: 16 ASCII digits, not all zeros."""
    return len(text) == 16 and text.isascii() and text.isdigit() and text != "0" * 16


def parse_epoch(epoch: str | None) -> str:
    """A client's cursor epoch (SSE ``?epoch=`` / ids, the WebSocket ``hello``, the WebRTC
    resume) as :class:`ClientFollow` takes it: ``""`` for none or ``"0"``, else the 16-digit
    generation the server issued; :class:`ValueError` for anything else."""
    if epoch is None or epoch == "0":
        return ""
    if not is_generation(epoch):
        raise ValueError("epoch: 0, or the 16-digit epoch the server said")
    return epoch


class ResumeAt(msgspec.Struct, forbid_unknown_fields=True):
    """Where a client's stream starts (the WebRTC resume, the WebSocket ``hello``): after seq
    ``after`` of epoch ``epoch`` (``"0"`` or none before any divergence), of ``types`` only."""

    after: Annotated[int, msgspec.Meta(ge=0)] = 0
    types: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]],
                     msgspec.Meta(max_length=64)] | None = None
    epoch: Annotated[str, msgspec.Meta(max_length=16)] | None = None

    def __post_init__(self) -> None:
        try:
            parse_epoch(self.epoch)
        except ValueError as exc:  # msgspec reports it as the message's validation error
            raise msgspec.ValidationError(str(exc)) from None


def diverged_fields(gone: HistoryDiverged) -> dict[str, object]:
    """What every transport's reset says about a divergence (SSE ``stream.reset``, the JSON
    page's ``reset``, the WebSocket ``reset``, the WebRTC ``reset`` control)."""
    return {"reason": "diverged", "after": gone.after, "resume_after": gone.resume_after,
            "epoch": gone.epoch, "seen_epoch": gone.seen_epoch or "0",
            "first_available": gone.first_available}


class ClientFollow:
    """One client's follow of ``session_id`` after ``after`` on ``followers``: iterate
    :meth:`items` (inside :func:`~eventcore._follow.closing_iter`). Batches of events in seq
    order, :class:`HistoryGone` where history is gone everywhere (the follow goes on after
    ``resume_after``), and one :class:`StreamEnd` last."""

    def __init__(
        self, followers: Followers, session_id: str, after: int, *, incarnation: str,
        types: Collection[str] | None = None, retry_cap_s: float | None = None,
        generation: str = "", on_follower: Callable[[Follower], None] | None = None,
    ) -> None:
        self.followers = followers
        self.on_follower = on_follower
        """Called with the follower once subscribed, before it is iterated (SSE's direct
        delivery, see ``Subscription.deliver_directly``)."""
        self.generation = generation
        """The stream epoch's generation of ``after`` (``""``: 0; see ``Follower``)."""
        self.session_id = session_id
        self.incarnation = incarnation
        self.types = types
        self.retry_cap_s = retry_cap_s
        self.sent = after
        """The last seq the client has been handed (the transport moves it)."""

    def end(self, reason: EndReason, error: EventcoreError | None = None) -> StreamEnd:
        return StreamEnd(reason, self.sent, self.incarnation, error)

    async def items(self) -> AsyncIterator[ClientItem]:
        try:
            async with self.followers.subscribe(self.session_id, self.sent, types=self.types,
                                                incarnation=self.incarnation,
                                                retry_cap_s=self.retry_cap_s) as follower:
                follower.generation = self.generation
                if self.on_follower is not None:
                    self.on_follower(follower)
                async with closing_iter(follower.batches()) as batches:
                    async for batch in batches:
                        yield batch
        except HubClosed:
            yield self.end("shutdown")
            return
        except SessionNotFound:
            yield self.end("deleted")
            return
        except EventcoreError as exc:
            yield self.end("error", exc)
            return
        yield self.end("ended")


@dataclass(frozen=True, slots=True)
class InputOutcome:
    """What became of one client input: appended (``seq``, ``duplicate``) or refused
    (``status``, ``error`` code, ``detail``; nothing written). ``deleted``: the session the
    client was opened for is gone, and the transport should close."""

    seq: int = 0
    duplicate: bool = False
    status: int = 0
    error: str = ""
    detail: str = ""
    deleted: bool = False

    @property
    def accepted(self) -> bool:
        return self.status == 0


def refusal(status: int, error: str, detail: str, *, deleted: bool = False) -> InputOutcome:
    return InputOutcome(status=status, error=error, detail=detail[:300], deleted=deleted)


async def client_input(
    log: EventLog, session_id: str, incarnation: str, kind: Literal["input", "signal"], *,
    payload: Any = None, idempotency_key: str | None = None, key: str = "", value: Any = None,
    server_data: Any = None,
) -> InputOutcome:
    """Append an input (``payload``, ``idempotency_key``, ``server_data``) or a signal (``key``,
    ``value``) to ``session_id`` if it is still ``incarnation``; never raises for the client's
    mistakes."""
    from ._http._routes import input_event_key  # not at import: _routes imports SSE, and SSE this

    try:
        # the client was authorized for one incarnation; appends go by session id, and the id
        # may name another session now (one read per input: inputs come at human pace)
        current = (await log.incarnations([session_id]))[session_id]
        if current != incarnation:
            return refusal(404, "session_deleted", f"session {session_id!r} was deleted (its "
                           "id may name a new session now)", deleted=True)
        if kind == "input":
            event_key = "" if idempotency_key is None else input_event_key(idempotency_key)
            res = await log.append(Envelope(type="input", session_id=session_id,
                                            payload=validate_value(payload, "payload"),
                                            event_key=event_key, server_data=server_data))
        else:
            res = await log.signal(session_id, key, value)
    except PayloadTooLarge as exc:
        return refusal(413, "too_large", str(exc))
    except (ValidationError, ValueError) as exc:
        return refusal(400, "invalid", str(exc))
    except SessionEnded as exc:
        return refusal(409, "session_ended", str(exc))
    except SessionNotFound as exc:
        return refusal(404, "not_found", str(exc))
    except EventcoreError as exc:
        logger.warning("client input for %s failed: %s", session_id, exc)
        return refusal(503, "unavailable", str(exc))
    return InputOutcome(seq=res.seq, duplicate=res.duplicate)
