"""A real WebSocket client (``websockets``) speaking the session socket's framing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SUBPROTOCOL = "eventcore.v1"


def ws_url(http_url: str, session_id: str) -> str:
    return http_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/ws"


async def open_ws(http_url: str, session_id: str, token: str | None, *, after: int = 0,
                  via: str = "subprotocol", **hello: Any) -> ClientConnection:
    """Connected and past ``ready``."""
    protos = [SUBPROTOCOL]
    headers = {}
    body: dict[str, Any] = {"type": "hello", "after": after, **hello}
    if token is not None:
        if via == "subprotocol":
            protos.append(f"eventcore.token.{token}")
        elif via == "header":
            headers["Authorization"] = f"Bearer {token}"
        else:
            body["token"] = token
    ws = await connect(ws_url(http_url, session_id), subprotocols=protos,  # type: ignore[arg-type]
                       additional_headers=headers, max_size=None, open_timeout=10)
    assert ws.subprotocol == SUBPROTOCOL
    await ws.send(json.dumps(body))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    assert ready["after"] == after
    return ws


async def close_code(ws: ClientConnection, limit_s: float = 15) -> tuple[int, str, list[Any]]:
    """Read until the server closes: its code, reason and the messages before."""
    seen: list[Any] = []
    with anyio.fail_after(limit_s):
        try:
            while True:
                seen.append(json.loads(await ws.recv()))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, f"closed without a close frame from the server: {exc}"
            return exc.rcvd.code, exc.rcvd.reason, seen


@dataclass
class Reader:
    """Collects the envelopes of ``events`` messages and the other messages."""

    ws: ClientConnection
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    others: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.envelopes]

    async def one(self) -> dict[str, Any]:
        msg: dict[str, Any] = json.loads(await self.ws.recv())
        if msg["type"] == "events":
            assert msg["events"], msg
            self.envelopes += msg["events"]
        else:
            self.others.append(msg)
        return msg

    async def until_seq(self, seq: int, limit_s: float = 20) -> None:
        with anyio.fail_after(limit_s):
            while not self.envelopes or self.envelopes[-1]["seq"] < seq:
                await self.one()

    async def reply(self, limit_s: float = 20) -> dict[str, Any]:
        """The next ack/error (events meanwhile are collected)."""
        with anyio.fail_after(limit_s):
            while True:
                msg = await self.one()
                if msg["type"] in ("ack", "error"):
                    return msg
