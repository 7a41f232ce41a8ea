"""Keys.session: a session's key names, and its shard's, as every other builder names them
(the shard-level names are built once per shard and shared by every SessionKeys)."""

from __future__ import annotations

from eventcore import Keys


def test_session_keys_name_the_session_and_its_shard() -> None:
    keys = Keys("ns1", 16)
    for sid in ("a", "b12345", "s_0123abcd", "x.y:z-1"):
        shard = keys.shard_of(sid)
        t = f"ns1:{{{shard}}}"
        k = keys.session(sid)
        assert (k.session_id, k.shard) == (sid, shard)
        assert (k.stream, k.meta, k.dedupe, k.signals, k.effects, k.lease) == (
            f"{t}:session/{sid}", f"{t}:meta:{sid}", f"{t}:dedupe:{sid}",
            f"{t}:signals:{sid}", f"{t}:effects:{sid}", f"{t}:lease:{sid}")
        assert (k.feed, k.dispatch, k.notify, k.wake, k.sessions) == (
            keys.feed(shard), keys.dispatch(shard), keys.notify(shard), keys.wake(shard),
            keys.sessions(shard))
        assert k.incarnation == f"{t}:incarnation"
        assert k.per_session == (k.stream, k.meta, k.dedupe, k.signals, k.effects, k.lease)
        assert keys.session(sid) == k  # the same names again, from the shard's cache
