"""``/v1/schedules`` over real HTTP (uvicorn in the test process, real Redis): admin only, CRUD,
idempotent create, 404/409/422 problems, hostile expressions and timezones fuzzed."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_service import Service, serve

from eventcore import EventLog
from eventcore.schedules import Scheduler


@pytest.fixture
async def service(event_log: EventLog) -> AsyncIterator[Service]:
    async with serve(event_log, services=()) as svc:  # no scheduler on the real clock
        yield svc


BODY = {"id": "daily", "cron": "0 9 * * 1-5", "timezone": "Europe/Berlin", "agent": "echo",
        "input": {"text": "good morning"}, "labels": {"team": "ops"}}


async def test_crud(service: Service) -> None:
    async with service.client(service.api_key) as c:
        r = await c.post("/v1/schedules", json=BODY)
        assert r.status_code == 201, r.text
        made = r.json()
        assert made["id"] == "daily" and made["enabled"] and made["catchup"] == "once"
        nxt = dt.datetime.fromisoformat(made["next_run_at"])
        assert nxt.astimezone(dt.UTC).hour in (7, 8)  # 09:00 Berlin
        again = await c.post("/v1/schedules", json=BODY)
        assert again.status_code == 200 and again.json() == made
        clash = await c.post("/v1/schedules", json={**BODY, "cron": "0 10 * * *"})
        assert clash.status_code == 409
        assert clash.json()["type"].endswith("schedule-conflict")
        assert (await c.get("/v1/schedules/daily")).json() == made
        listed = (await c.get("/v1/schedules")).json()["schedules"]
        assert [s["id"] for s in listed] == ["daily"]
        off = await c.patch("/v1/schedules/daily", json={"enabled": False})
        assert off.status_code == 200 and off.json()["next_run_at"] is None
        changed = await c.patch("/v1/schedules/daily", json={"cron": "*/5 * * * *",
                                                               "enabled": True})
        assert changed.json()["cron"] == "*/5 * * * *" and changed.json()["revision"] == 3
        bad = await c.patch("/v1/schedules/daily", json={"timezone": "Nowhere/Land"})
        assert bad.status_code == 422 and "timezone" in bad.json()["detail"]
        assert (await c.patch("/v1/schedules/daily", json={"cron": None})).status_code == 422
        assert (await c.delete("/v1/schedules/daily")).status_code == 204
        gone = await c.get("/v1/schedules/daily")
        assert gone.status_code == 404 and gone.json()["type"].endswith("schedule-not-found")
        assert (await c.delete("/v1/schedules/daily")).status_code == 404
        assert (await c.patch("/v1/schedules/daily", json={"enabled": True})).status_code == 404


async def test_admin_only(service: Service) -> None:
    _, token = await service.create_session()
    async with service.client() as anon, service.client(token) as session:
        assert (await anon.get("/v1/schedules")).status_code == 401
        assert (await session.get("/v1/schedules")).status_code == 403
        assert (await session.post("/v1/schedules", json=BODY)).status_code == 403
    async with service.client(service.api_key) as c:
        assert (await c.get("/v1/schedules")).json() == {"schedules": []}


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("cron", "61 * * * *", "cron expression"),
    ("cron", "* * * *", "5 (minute hour"),
    ("cron", "0 0 30 2 *", "cron expression"),
    ("timezone", "Mars/Olympus", "timezone"),
    ("timezone", "../../etc/passwd", "timezone"),
    ("id", "no spaces", "schedule id"),
    ("catchup", "sometimes", ""),
])
async def test_invalid_definitions_are_422(service: Service, field: str, value: str,
                                           needle: str) -> None:
    async with service.client(service.api_key) as c:
        r = await c.post("/v1/schedules", json={**BODY, field: value})
        assert r.status_code == 422, r.text
        assert needle in r.text
        assert (await c.get("/v1/schedules")).json() == {"schedules": []}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cron=st.text(max_size=30) | st.from_regex(r"[0-9*/,\-A-Z ]{1,20}", fullmatch=True),
       tz=st.text(max_size=20) | st.sampled_from(["UTC", "Europe/Berlin", "Etc/GMT+5"]))
async def test_fuzz_never_a_server_error(service: Service, cron: str, tz: str) -> None:
    async with service.client(service.api_key) as c:
        r = await c.post("/v1/schedules", json={**BODY, "id": "fz", "cron": cron,
                                                "timezone": tz})
        assert r.status_code in (201, 422), r.text
        if r.status_code == 201:
            assert (await c.delete("/v1/schedules/fz")).status_code == 204


async def test_a_schedule_made_over_http_fires(service: Service) -> None:
    async with service.client(service.api_key) as c:
        r = await c.post("/v1/schedules", json={**BODY, "id": "m", "cron": "* * * * *",
                                                "timezone": "UTC"})
        made = r.json()
    t = dt.datetime.fromisoformat(made["next_run_at"]).timestamp()
    assert await Scheduler(service.log, now=lambda: t + 1).tick() == 1
    async with service.client(service.api_key) as c:
        now = (await c.get("/v1/schedules/m")).json()
        assert now["fired"] == 1 and now["last_run_at"] == made["next_run_at"]
        session = (await c.get(f"/v1/sessions/{now['last_session_id']}")).json()
        assert session["agent"] == "echo" and session["labels"]["schedule"] == "m"
