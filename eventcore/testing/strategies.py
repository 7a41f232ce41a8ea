"""Hypothesis strategies for envelopes and operation sequences on a session log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from .._envelope import Envelope
from .._values import MAX_SAFE_INT

__all__ = [
    "KEY_POOL",
    "Append",
    "AppendBatch",
    "Effect",
    "Operation",
    "Read",
    "Retry",
    "Signal",
    "envelopes",
    "event_key_choices",
    "event_keys",
    "hostile_keys",
    "hostile_session_ids",
    "json_values",
    "operations",
    "session_ids",
]

session_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,40}", fullmatch=True)
event_keys = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1, max_size=40,
)
USER_TYPES = ("input", "message", "log", "tool.started", "tool.ended", "custom.thing")


def json_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    scalars = (
        st.none() | st.booleans() | st.integers(-MAX_SAFE_INT, MAX_SAFE_INT)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=4),
        max_leaves=max_leaves,
    )


KEY_POOL = ("k0", "k1", "k2", "k3")


def event_key_choices(pool: tuple[str, ...] = KEY_POOL) -> st.SearchStrategy[str]:
    """What a caller puts in ``event_key``: ``""`` (the log generates one), a key from a small
    pool (so appends collide and must dedupe), or any valid key."""
    return st.one_of(st.just(""), st.sampled_from(pool), event_keys)


hostile_session_ids: st.SearchStrategy[object] = st.one_of(
    st.just(""),
    st.from_regex(r"[A-Za-z0-9]{129,200}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9]{0,5}[{}/ \x00\n][A-Za-z0-9{}]{0,5}", fullmatch=True),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
    st.binary(max_size=10),
    st.integers(),
    st.none(),
)
"""Values every session-id-taking call must reject with ``ValidationError``."""

hostile_keys: st.SearchStrategy[object] = st.one_of(
    st.text(min_size=513, max_size=600),
    st.text(max_size=5).map(lambda s: s + "\x00"),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
    st.binary(min_size=1, max_size=10),
    st.integers(),
)
"""Values every key-taking call (event, signal, effect, idempotency keys) must reject."""


@st.composite
def envelopes(
    draw: st.DrawFn,
    session_id: str | None = None,
    types: tuple[str, ...] = USER_TYPES,
    keys: st.SearchStrategy[str] | None = None,
) -> Envelope:
    """Envelopes of user types; ``keys`` draws the event key (default
    :func:`event_key_choices`: generated, colliding, or arbitrary)."""
    return Envelope(
        type=draw(st.sampled_from(types)),
        session_id=session_id if session_id is not None else draw(session_ids),
        event_key=draw(keys if keys is not None else event_key_choices()),
        payload=draw(json_values()),
        run_id=draw(st.none() | st.from_regex(r"run-[0-9]{1,3}", fullmatch=True)),
        server_data=draw(st.none() | json_values(3)),
    )


@dataclass(frozen=True)
class Append:
    envelope: Envelope


@dataclass(frozen=True)
class AppendBatch:
    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True)
class Retry:
    """Append again an envelope appended earlier (index into the history of appends)."""

    index: int


@dataclass(frozen=True)
class Signal:
    key: str
    value: Any


@dataclass(frozen=True)
class Read:
    after: int
    limit: int


@dataclass(frozen=True)
class Effect:
    """Run the effect ``key`` (its function must run once per session and key)."""

    key: str


Operation = Append | AppendBatch | Retry | Signal | Read | Effect


def operations(
    session_id: str, max_size: int = 30, keys: st.SearchStrategy[str] | None = None
) -> st.SearchStrategy[list[Operation]]:
    """Sequences of log operations on one session, for model-based and ordering tests.
    ``Retry(i)`` re-appends the i-th (modulo) envelope appended before, with its own key."""
    env = envelopes(session_id, keys=keys)
    op: st.SearchStrategy[Operation] = st.one_of(
        env.map(Append),
        st.lists(env, min_size=1, max_size=8).map(lambda xs: AppendBatch(tuple(xs))),
        st.integers(0, 100).map(Retry),
        st.builds(Signal, st.sampled_from(["status", "progress", "mood"]), json_values(3)),
        st.builds(Read, st.integers(0, 60), st.integers(1, 20)),
        st.builds(Effect, st.sampled_from(["charge", "email", "lookup"])),
    )
    return st.lists(op, max_size=max_size)
