"""``eventcore sessions list|show|send|cancel|dead-letters``: the HTTP API from a terminal.

Every verb talks to a running API (``--url`` / ``EVENTCORE_URL``, default
``http://127.0.0.1:8000``) with the API key (``--api-key`` / ``EVENTCORE_API_KEY``). Output is a
table for people, or ``--json`` for scripts: ``list`` prints one session per line (JSON lines),
the other verbs the API's answer. Errors are one line on stderr: exit 1 for what the server
refused or a server that cannot be reached, 2 for bad arguments.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["sessions_app"]

sessions_app = typer.Typer(help="Browse and control sessions through the HTTP API.",
                           no_args_is_help=True)
_out = Console(soft_wrap=True, highlight=False)

Url = Annotated[str, typer.Option("--url", envvar="EVENTCORE_URL",
                                  help="The API's base URL.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="EVENTCORE_API_KEY",
                                            show_default=False, help="The API key.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _fail(verb: str, message: str, code: int = 1) -> NoReturn:
    typer.echo(f"eventcore sessions {verb}: error: {message}", err=True)
    raise typer.Exit(code)


def _client(verb: str, url: str, api_key: str | None) -> httpx.Client:
    if not api_key:
        _fail(verb, "no API key: pass --api-key or set EVENTCORE_API_KEY", 2)
    return httpx.Client(base_url=url.rstrip("/"), timeout=30,
                        headers={"Authorization": f"Bearer {api_key}"})


def _call(verb: str, client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        r = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        _fail(verb, f"cannot reach {client.base_url}: {exc}")
    if r.status_code >= 400:
        detail = r.reason_phrase
        try:
            body = r.json()
            detail = body.get("detail") or body.get("title") or detail
            errors = body.get("errors")
            if errors:
                detail += ": " + "; ".join(
                    f"{'.'.join(e.get('loc', [])[1:]) or '?'}: {e.get('msg')}" for e in errors[:3])
        except ValueError:
            pass
        _fail(verb, f"{r.status_code} {detail}")
    if r.status_code == 204 or not r.content:
        return None
    return r.json()


def _when(text: str | None) -> str:
    if not text:
        return "-"
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    return t.astimezone(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) or "-"


def _pages(verb: str, client: httpx.Client, params: dict[str, Any], everything: bool
           ) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
    while True:
        body = _call(verb, client, "GET", "/v1/sessions", params=params)
        yield body["sessions"], body["next_cursor"]
        if not everything or body["next_cursor"] is None:
            return
        params = {**params, "cursor": body["next_cursor"]}


@sessions_app.command("list")
def list_(
    agent: Annotated[str | None, typer.Option(help="Only this agent's sessions.")] = None,
    state: Annotated[list[str] | None, typer.Option(
        help="Only sessions in this state (created, active, idle, ended); repeatable.")] = None,
    label: Annotated[list[str] | None, typer.Option(
        help="key=value (or key: any value); repeatable, all must hold.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Created at or after (ISO 8601, UTC without an offset).")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", help="Created before (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Sessions per page.")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Start at this next_cursor.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Follow the cursor to the end."
                                             )] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Sessions, newest first."""
    params: dict[str, Any] = {"limit": limit}
    for name, value in (("agent", agent), ("state", state), ("label", label),
                        ("created_after", since), ("created_before", until),
                        ("cursor", cursor)):
        if value:
            params[name] = value
    with _client("list", url, api_key) as client:
        table = Table("SESSION", "AGENT", "STATE", "SEQ", "CREATED", "HOST", "LABELS",
                      box=None, pad_edge=False)
        last_cursor = None
        count = 0
        for sessions, page_cursor in _pages("list", client, params, everything):
            last_cursor = page_cursor
            for s in sessions:
                count += 1
                if as_json:
                    typer.echo(json.dumps(s, ensure_ascii=False))
                else:
                    table.add_row(s["session_id"], s["agent"] or "-", s["state"],
                                  str(s["last_seq"]), _when(s["created_at"]),
                                  s["host"] or "-", _labels(s["labels"]))
    if not as_json:
        if count:
            _out.print(table)
        else:
            _out.print("no sessions")
    if last_cursor is not None:
        typer.echo(f"more: --cursor {last_cursor}", err=True)


@sessions_app.command("show")
def show(
    session: Annotated[str, typer.Argument(help="The session id.")],
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """A session's state, metadata and projection."""
    with _client("show", url, api_key) as client:
        s = _call("show", client, "GET", f"/v1/sessions/{_path(session)}")
    if as_json:
        typer.echo(json.dumps(s, ensure_ascii=False))
        return
    rows = [("session", s["session_id"]), ("incarnation", s.get("incarnation") or "-"),
            ("agent", s["agent"] or "-"), ("state", s["state"]), ("last seq", s["last_seq"]),
            ("host", s.get("host") or "-"), ("labels", _labels(s["labels"])),
            ("created", _when(s["created_at"])), ("updated", _when(s["updated_at"])),
            ("ended", _when(s["ended_at"]))]
    for name, value in rows:
        _out.print(f"[bold]{name:<12}[/] {value}")
    if s.get("projection") is not None:
        _out.print("[bold]projection[/]   " + json.dumps(s["projection"], ensure_ascii=False))


def _path(session: str) -> str:
    from eventcore._keys import validate_session_id
    from eventcore.errors import ValidationError

    try:
        return validate_session_id(session)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc), param_hint="SESSION") from None


@sessions_app.command("send")
def send(
    session: Annotated[str, typer.Argument(help="The session id.")],
    payload: Annotated[str, typer.Argument(
        help='The input: JSON (e.g. \'{"text": "hi"}\'), or with --text plain text.')],
    text: Annotated[bool, typer.Option("--text", help='Send PAYLOAD as {"text": PAYLOAD}.'
                                       )] = False,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Sending again with this key appends nothing.")] = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Append an input to a session."""
    if text:
        value: Any = {"text": payload}
    else:
        try:
            value = json.loads(payload)
        except ValueError:
            _fail("send", "PAYLOAD is not JSON (use --text to send plain text)", 2)
    body: dict[str, Any] = {"payload": value}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    with _client("send", url, api_key) as client:
        res = _call("send", client, "POST", f"/v1/sessions/{_path(session)}/inputs", json=body)
    if as_json:
        typer.echo(json.dumps(res))
    else:
        _out.print(f"input {'already sent' if res['duplicate'] else 'sent'}: seq {res['seq']}")


@sessions_app.command("cancel")
def cancel(
    session: Annotated[str, typer.Argument(help="The session id.")],
    run: Annotated[str | None, typer.Option("--run", help="Cancel only this run.")] = None,
    reason: Annotated[str | None, typer.Option(help="Recorded with the request.")] = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Request cancellation of a session (or of one of its runs)."""
    body = {k: v for k, v in (("run_id", run), ("reason", reason)) if v is not None}
    with _client("cancel", url, api_key) as client:
        res = _call("cancel", client, "POST", f"/v1/sessions/{_path(session)}/cancel",
                    json=body)
    if as_json:
        typer.echo(json.dumps(res))
    else:
        _out.print(f"cancel requested: seq {res['seq']}")


@sessions_app.command("dead-letters")
def dead_letters(
    session: Annotated[str | None, typer.Option(help="Only this session's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most records per shard.")] = 100,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Sessions the workers gave up on, with their last error."""
    params: dict[str, Any] = {"limit": limit}
    if session is not None:
        params["session"] = _path(session)
    with _client("dead-letters", url, api_key) as client:
        body = _call("dead-letters", client, "GET", "/v1/dead-letters", params=params)
    records = body["dead_letters"]
    if as_json:
        for rec in records:
            typer.echo(json.dumps(rec, ensure_ascii=False))
        return
    if not records:
        _out.print("no dead letters")
        return
    table = Table("SESSION", "AGENT", "ATTEMPTS", "AT", "WORKER", "ERROR", box=None,
                  pad_edge=False)
    for rec in records:
        err = rec["error"]
        table.add_row(rec["session_id"], rec["agent"] or "-", str(rec["attempts"]),
                      _when(rec["at"]), rec["worker"] or "-",
                      f"{err.get('type', '?')}: {err.get('message', '')}"[:200])
    _out.print(table)
