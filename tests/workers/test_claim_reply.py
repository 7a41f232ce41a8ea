"""claim.lua's reply decoded by name in one place (workers._scripts.decode_claim)."""

from __future__ import annotations

from eventcore.workers._scripts import Claim, decode_claim


def test_an_ok_reply_decodes_by_name() -> None:
    got = decode_claim([b"ok", 3, b"support", b"2", b"", b"", b"1700000000000",
                        b'{"team":"a"}', b"1", 2, b"7"])
    assert got == Claim("ok", epoch=3, agent="support", attempt=2, dead=False, error="",
                        created_at_ms=1700000000000, labels={"team": "a"}, last_seq=1,
                        started=2, checkpoint_seq=7)


def test_a_dead_session_without_timestamps_or_checkpoint() -> None:
    got = decode_claim([b"ok", 1, b"", b"1", b"1", b'{"type":"CrashLoop"}', b"", b"[]", b"4",
                        0, b""])
    assert got.dead and got.error == '{"type":"CrashLoop"}'
    assert got.created_at_ms is None and got.labels == {} and got.checkpoint_seq == 0
    assert (got.last_seq, got.started) == (4, 0)


def test_other_verdicts_keep_their_detail() -> None:
    assert decode_claim([b"held", b"worker-2"]) == Claim("held", "worker-2")
    assert decode_claim([b"corrupt", b"WRONGTYPE"]) == Claim("corrupt", "WRONGTYPE")
    assert decode_claim([b"gone"]) == Claim("gone")
