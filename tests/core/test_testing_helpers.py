"""eventcore.testing as users get it: the README's example, the strategies and invariants."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventcore import Envelope, EventLog, ValidationError, validate_key, validate_session_id
from eventcore.testing.invariants import (
    assert_acknowledged_present,
    assert_gap_free,
    assert_no_duplicate_keys,
    assert_replay_suffixes,
    assert_strictly_increasing,
    check_log,
)
from eventcore.testing.strategies import envelopes, hostile_keys, hostile_session_ids


# The README's example, verbatim.
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(envelopes("s1"), max_size=20), data=st.data())
def test_batches_replay_in_order(redis_url, batch, data):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        namespace = f"t{data.draw(st.uuids()).hex[:12]}"  # a fresh log per example
        async with EventLog(redis_url=redis_url, namespace=namespace) as log:
            await log.create_session(session_id="s1")
            await log.append_many(batch)
            check_log(await assert_replay_suffixes(log, "s1"))
    anyio.run(run)


@settings(max_examples=200)
@given(hostile_session_ids)
def test_hostile_session_ids_strategy_is_rejected(value: object) -> None:
    with pytest.raises(ValidationError):
        validate_session_id(value)


@settings(max_examples=200)
@given(hostile_keys)
def test_hostile_keys_strategy_is_rejected(value: object) -> None:
    with pytest.raises(ValidationError):
        validate_key(value)


def _e(seq: int, key: str) -> Envelope:
    return Envelope(type="m", session_id="s", seq=seq, event_key=key)


def test_invariants_catch_broken_logs() -> None:
    good = [_e(1, "a"), _e(2, "b"), _e(3, "c")]
    check_log(good)
    with pytest.raises(AssertionError, match="gap"):
        assert_gap_free([_e(1, "a"), _e(3, "c")])
    with pytest.raises(AssertionError, match="not increasing"):
        assert_strictly_increasing([_e(2, "a"), _e(1, "b")])
    with pytest.raises(AssertionError, match="event key"):
        assert_no_duplicate_keys([_e(1, "a"), _e(2, "a")])
    with pytest.raises(AssertionError, match="missing"):
        assert_acknowledged_present(good, {"zz": 4})
    with pytest.raises(AssertionError, match="acknowledged at"):
        assert_acknowledged_present(good, {"a": 2})
