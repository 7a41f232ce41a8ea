"""The client's SSE parser reads back what the server's encoder (sse-starlette, as
``server/_http/_sse.py`` frames events) writes, whatever the text, and ignores what is not an
event (comments, pings, stray blank lines)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from eventcore.client._sse import SseEvent, SseParser

_LINE = st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)))
_NAME = _LINE.filter(lambda s: s.strip() == s and s != "")


def _parse(wire: str) -> list[SseEvent]:
    parser, out = SseParser(), []
    for line in wire.split("\n"):
        ev = parser.feed(line)
        if ev is not None:
            out.append(ev)
    return out


@given(st.lists(st.tuples(_NAME, st.lists(_LINE, min_size=1, max_size=4),
                          st.one_of(st.none(), st.integers(0, 2**53).map(str)),
                          st.one_of(st.none(), st.integers(0, 10**6))),
                max_size=8))
def test_what_the_server_frames_is_read_back(events: list[tuple[str, list[str], str | None,
                                                               int | None]]) -> None:
    wire = ": ping\n"
    for name, data, id_, retry in events:
        wire += ServerSentEvent(data="\n".join(data), event=name, id=id_, retry=retry,
                                sep="\n").encode().decode()
        wire += ": ping\n"
    got = _parse(wire)
    assert [(e.event, e.data, e.id, e.retry_ms) for e in got] == [
        (name, "\n".join(data), id_, retry) for name, data, id_, retry in events]


def test_comments_and_blank_lines_are_not_events() -> None:
    assert _parse(": ping\n\n\n: ping\n\n") == []
    (ev,) = _parse("data: x\n\n")
    assert (ev.event, ev.data, ev.id) == ("message", "x", None)
    (ev,) = _parse("event: a\ndata:no-space\ndata:  two\nid: 7\nretry: x\n\n")
    assert (ev.event, ev.data, ev.id, ev.retry_ms) == ("a", "no-space\n two", "7", None)
