"""A schemathesis run over the served OpenAPI schema: generated valid and invalid requests on
every operation, against the real server; no 5xx, and every response conforms to the schema
(status code documented, content type, body shape)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from service_support import API_KEY, Service

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _session(client: httpx.Client, *, ended: bool) -> str:
    r = client.post("/v1/sessions", json={"agent": "echo", "input": {"text": "hi"}})
    sid: str = r.json()["session_id"]
    client.post(f"/v1/sessions/{sid}/signals", json={"key": "status", "value": "ok"})
    if ended:
        client.post(f"/v1/sessions/{sid}/cancel", json={})
    return sid


def _runner(op: Any, strategy: Any, url: str, headers: dict[str, str],
            statuses: dict[int, int], failures: list[str]) -> Any:
    @given(pair=strategy)
    @settings(max_examples=12, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(pair: tuple[Any, str | None]) -> None:
        case, sid = pair
        if sid is not None and "session_id" in (case.path_parameters or {}):
            case.path_parameters["session_id"] = sid
        if op.method.upper() == "DELETE" and sid is not None:
            return  # keep the shared sessions alive for the other operations
        response = case.call(base_url=url, headers=headers, timeout=10)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 400 and response.content == b"Invalid HTTP request received.":
            return  # refused by the HTTP server's parser (e.g. control bytes in a header)
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as exc:  # collect, then report every operation that failed
            failures.append(f"{op.method.upper()} {op.path}: {exc}"[:2000])
            raise

    return run


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(shared_service: Service, mode: GenerationMode
                                            ) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=shared_service.url, headers=headers, timeout=10) as c:
        sessions = [_session(c, ended=False), _session(c, ended=True)]
    schema = schemathesis.openapi.from_url(shared_service.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for op in operations:
        # a real session half of the time (else the session endpoints only ever answer 404);
        # SSE only on the ended one, whose stream ends by itself
        real = sessions[1:] if op.path.endswith("/events") else sessions
        strategy = st.tuples(op.as_strategy(generation_mode=mode),
                             st.sampled_from([None, *real]))

        run = _runner(op, strategy, shared_service.url, headers, statuses, failures)
        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # no parameters to make invalid
        except Exception as exc:
            if not failures or not failures[-1].startswith(f"{op.method.upper()} {op.path}"):
                failures.append(f"{op.method.upper()} {op.path}: {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures[:5])
    print(mode, sorted(statuses.items()))
    assert sum(statuses.values()) >= 60  # the run did exercise the server
    assert not any(code >= 500 for code in statuses)
