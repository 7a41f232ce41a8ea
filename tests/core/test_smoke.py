from eventcore import Envelope, EventLog


async def test_append_read_roundtrip(event_log: EventLog) -> None:
    s = await event_log.create_session("echo")
    r = await event_log.append(Envelope(type="input", session_id=s.session_id, payload={"x": 1}))
    assert r.seq == 2
    got = await event_log.read(s.session_id)
    assert [e.seq for e in got] == [1, 2]
    assert got[1].payload == {"x": 1}
