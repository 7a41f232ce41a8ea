"""GET /v1/sessions (the listing) and GET /v1/sessions/{id} (describe) against a real API
process: admin only, filters, cursor pages, deletes leave the list, hostile parameters 422,
a hypothesis fuzz of the query string (never a 5xx)."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_support import API_KEY, Service

PROBLEM = "application/problem+json"


async def _page_all(c: httpx.AsyncClient, params: dict[str, Any], limit: int = 3
                    ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        q = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = await c.get("/v1/sessions", params=q)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["sessions"]) <= limit
        out += body["sessions"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("the listing never ended")


async def test_list_filters_pages_and_deletes(shared_service: Service) -> None:
    tag = uuid.uuid4().hex[:8]
    made = []
    for i in range(8):
        sid, _ = await shared_service.create(
            "echo", metadata={"run": tag, "parity": "odd" if i % 2 else "even"})
        made.append(sid)
    async with shared_service.client() as c:
        listed = await _page_all(c, {"label": f"run={tag}"})
        assert [s["session_id"] for s in listed] == made[::-1]
        first = listed[-1]
        assert first["agent"] == "echo" and first["state"] == "created"
        assert first["labels"] == {"run": tag, "parity": "even"}
        assert first["last_seq"] == 1 and first["incarnation"] and first["created_at"]
        odd = await _page_all(c, {"label": [f"run={tag}", "parity=odd"]})
        assert [s["session_id"] for s in odd] == made[1::2][::-1]
        none = await _page_all(c, {"label": f"run={tag}", "state": "ended,idle"})
        assert none == []
        assert (await c.delete(f"/v1/sessions/{made[3]}")).status_code == 204
        after = await _page_all(c, {"label": f"run={tag}"}, limit=100)
        assert made[3] not in [s["session_id"] for s in after] and len(after) == 7
        since = await _page_all(c, {"label": f"run={tag}",
                                    "created_after": listed[1]["created_at"]})
        assert [s["session_id"] for s in since] == [made[7], made[6]]
        # describe: the metadata, the host for the API key
        d = (await c.get(f"/v1/sessions/{made[0]}")).json()
        assert d["state"] == "created" and d["agent"] == "echo" and d["last_seq"] == 1
        assert "host" in d and d["ttl_s"] is not None


async def test_list_needs_the_api_key(shared_service: Service) -> None:
    _, token = await shared_service.create("echo")
    async with shared_service.client(token) as c:
        r = await c.get("/v1/sessions")
        assert r.status_code == 403 and r.headers["content-type"] == PROBLEM
    async with shared_service.client(None) as c:
        assert (await c.get("/v1/sessions")).status_code == 401
        r = await c.get("/v1/sessions", params={"access_token": token})
        assert r.status_code == 401  # an rw token is never taken from a URL
    async with shared_service.client(token) as c:
        sid = (await c.get("/v1/sessions/x")).status_code
        assert sid == 403
    made_sid, made_token = await shared_service.create("echo")
    async with shared_service.client(made_token) as c:
        d = (await c.get(f"/v1/sessions/{made_sid}")).json()
        assert d["host"] is None and d["ttl_s"] is None


@pytest.mark.parametrize("query", [
    "limit=0", "limit=1001", "limit=%C2%B2", "limit=+1", "limit=1.0", "limit=abc",
    "state=running", "state=active,nope", "cursor=", "cursor=%00", "cursor=" + "a" * 600,
    "cursor=eyJhIjoxfQ", "cursor=WzEsLTEsInMiLCJ4Il0", "created_after=yesterday",
    "created_after=2024-13-01", "created_before=1e400",
    "created_after=2030-01-01T00:00:00Z&created_before=2020-01-01T00:00:00Z",
    "label=", "label==v", "label=" + "k" * 200 + "=v",
    "&".join(f"label=k{i}=v" for i in range(17)), "agent=", "agent=" + "a" * 501,
])
async def test_hostile_list_parameters_are_422(shared_service: Service, query: str) -> None:
    async with shared_service.client() as c:
        r = await c.get(f"/v1/sessions?{query}")
        assert r.status_code == 422, (query, r.status_code, r.text)
        assert r.headers["content-type"] == PROBLEM


async def test_cursor_of_other_filters_is_refused(shared_service: Service) -> None:
    for _ in range(3):
        await shared_service.create("echo")
    async with shared_service.client() as c:
        page = (await c.get("/v1/sessions", params={"limit": 1})).json()
        assert page["next_cursor"]
        r = await c.get("/v1/sessions", params={"limit": 1, "agent": "other",
                                                "cursor": page["next_cursor"]})
        assert r.status_code == 422 and "other filters" in r.json()["detail"]


_NAMES = ["agent", "state", "label", "created_after", "created_before", "limit", "cursor",
          "bogus"]
_VALUES = st.one_of(
    st.text(max_size=30), st.sampled_from(["1", "0", "50", "ended", "idle,active", "k=v", "=",
                                            "2024-01-01", "2024-01-01T00:00:00+25:00",
                                            "\u0661", "9" * 40, "-1", "WzFd", "%ff"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(pairs=st.lists(st.tuples(st.sampled_from(_NAMES), _VALUES), max_size=5))
def test_fuzz_list_query_never_5xx(shared_service: Service,
                                   pairs: list[tuple[str, str]]) -> None:
    query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in pairs)
    r = httpx.get(f"{shared_service.url}/v1/sessions?{query}", timeout=30,
                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code in (200, 422), (query, r.status_code, r.text)
    if r.status_code == 200:
        body = r.json()
        assert isinstance(body["sessions"], list)
    else:
        assert r.headers["content-type"] == PROBLEM
