"""Invariant checkers for a session log. Each raises AssertionError naming the first violation."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from .._envelope import Envelope
from .._log import EventLog

__all__ = [
    "assert_acknowledged_present",
    "assert_gap_free",
    "assert_latest_signals",
    "assert_no_duplicate_keys",
    "assert_replay_suffixes",
    "assert_same_events",
    "assert_strictly_increasing",
    "assert_tail_exact",
    "check_log",
    "read_all",
]


def assert_strictly_increasing(envelopes: Sequence[Envelope]) -> None:
    for prev, cur in itertools.pairwise(envelopes):
        assert cur.seq > prev.seq, f"seq not increasing: {prev.seq} then {cur.seq}"


def assert_gap_free(envelopes: Sequence[Envelope], start: int = 1) -> None:
    for i, env in enumerate(envelopes):
        assert env.seq == start + i, f"gap: expected seq {start + i}, found {env.seq}"


def assert_no_duplicate_keys(envelopes: Sequence[Envelope]) -> None:
    seen: dict[str, int] = {}
    for env in envelopes:
        assert env.event_key not in seen, (
            f"event key {env.event_key!r} at seq {seen.get(env.event_key)} and {env.seq}"
        )
        seen[env.event_key] = env.seq


def assert_acknowledged_present(
    envelopes: Sequence[Envelope], acknowledged: Mapping[str, int]
) -> None:
    """Every append the caller saw succeed (event key -> seq) is in the log at that seq."""
    by_key = {e.event_key: e.seq for e in envelopes}
    for key, seq in acknowledged.items():
        assert key in by_key, f"acknowledged event {key!r} (seq {seq}) is missing"
        assert by_key[key] == seq, f"event {key!r} acknowledged at {seq}, stored at {by_key[key]}"


def check_log(envelopes: Sequence[Envelope]) -> None:
    """A complete session log: strictly increasing, gap-free from 1, each event key once."""
    assert_strictly_increasing(envelopes)
    assert_gap_free(envelopes)
    assert_no_duplicate_keys(envelopes)


def assert_same_events(got: Sequence[Envelope], want: Sequence[Envelope]) -> None:
    """Two lists hold the same envelopes (seq, type, key, payload, server data, ...)."""
    assert len(got) == len(want), f"{len(got)} envelopes, expected {len(want)}"
    for g, w in zip(got, want, strict=True):
        assert g == w, f"seq {w.seq}: got {g!r}, expected {w!r}"


def assert_tail_exact(seen: Sequence[Envelope], full: Sequence[Envelope], after: int) -> None:
    """What a follower starting after ``after`` saw is exactly the log's suffix: the seam
    between catch-up and live lost nothing and repeated nothing."""
    assert [e.seq for e in seen] == [e.seq for e in full[after:]], (
        f"tail after {after} saw seqs {[e.seq for e in seen][:20]}..., expected "
        f"{after + 1}..{len(full)}"
    )
    assert_same_events(seen, full[after:])


def assert_latest_signals(full: Sequence[Envelope], latest: Mapping[str, Envelope]) -> None:
    """The latest value of each signal key is the last ``signal`` envelope with that key."""
    want: dict[str, Envelope] = {}
    for env in full:
        if env.type == "signal":
            key = env.payload["key"] if isinstance(env.payload, dict) else env.payload.key
            want[key] = env
    assert set(latest) == set(want), f"latest keys {sorted(latest)} != {sorted(want)}"
    for key, env in want.items():
        assert latest[key].seq == env.seq, f"latest {key!r} is seq {latest[key].seq}, not {env.seq}"


async def read_all(log: EventLog, session_id: str, after: int = 0) -> list[Envelope]:
    """The whole log of a session after ``after``, page by page."""
    out: list[Envelope] = []
    while True:
        page = await log.read(session_id, after, 1000)
        if not page:
            return out
        out += page
        after = page[-1].seq


async def assert_replay_suffixes(
    log: EventLog, session_id: str, points: Sequence[int] | None = None
) -> list[Envelope]:
    """Replaying from any k equals the suffix of the full read after k. Returns the full log."""
    full = await read_all(log, session_id)
    check_log(full)
    for k in points if points is not None else range(len(full) + 1):
        suffix = await read_all(log, session_id, k)
        assert [e.seq for e in suffix] == [e.seq for e in full[k:]], f"replay from {k} differs"
        assert suffix == full[k:], f"replay from {k} returned different envelopes"
    return full
