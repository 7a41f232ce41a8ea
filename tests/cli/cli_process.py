"""Run the real ``eventcore`` CLI as a child process and read its output line by line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

CLI = [sys.executable, "-c", "from eventcore.server._cli import main; main()"]


async def wait_readyz(http: httpx.AsyncClient, within: float = 30.0) -> None:
    """Until the child API answers ``/readyz`` with 200: its readiness is only observable
    over HTTP."""
    with anyio.fail_after(within):
        while True:
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.1)


class Cli:
    def __init__(self, proc: Process) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self._out = BufferedByteReceiveStream(proc.stdout)
        self._err = BufferedByteReceiveStream(proc.stderr)
        self.stderr_lines: list[str] = []

    async def line(self) -> str:
        try:
            return (await self._out.receive_until(b"\n", 1 << 24)).decode()
        except anyio.IncompleteRead:
            err = bytearray(self._err.buffer)
            assert self.proc.stderr is not None
            async for chunk in self.proc.stderr:
                err += chunk
            raise AssertionError(f"the CLI ended its output early; stderr: {err.decode()}"
                                 ) from None

    async def envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = json.loads(await self.line())
        return env

    async def wait_stderr(self, needle: str) -> str:
        """The first stderr line containing ``needle`` (an event to wait on, not a sleep)."""
        while True:
            text = (await self._err.receive_until(b"\n", 1 << 20)).decode()
            self.stderr_lines.append(text)
            if needle in text:
                return text

    async def rest(self) -> tuple[str, str]:
        out = bytearray(self._out.buffer)
        err = bytearray(self._err.buffer)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        async for chunk in self.proc.stdout:
            out += chunk
        async for chunk in self.proc.stderr:
            err += chunk
        return out.decode(), err.decode()


@asynccontextmanager
async def run_cli(*args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[Cli]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCORE_")}
    full_env.update(env or {})
    proc = await anyio.open_process([*CLI, *args], env=full_env, stdin=subprocess.DEVNULL)
    try:
        yield Cli(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with anyio.CancelScope(shield=True):
            await proc.wait()
            await proc.aclose()
