"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
commands on the child's fd 3, replies and events on fd 4, NUL-separated JSON). No driver
library and no downloaded browser: the Debian ``chromium`` package."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.file import FileReadStream, FileWriteStream
from anyio.streams.memory import MemoryObjectSendStream


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.browser.send(method, params, session_id=self.session_id)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JS expression; a promise is awaited (so the page can be waited on
        with its own events, e.g. a MutationObserver, instead of polling)."""
        res = await self.send("Runtime.evaluate", {"expression": expression,
                                                   "awaitPromise": True,
                                                   "returnByValue": True})
        if "exceptionDetails" in res:
            raise AssertionError(f"JS error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def subscribe(self, method: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """This tab's ``method`` events, for as long as the block runs."""
        return self.browser.subscribe(method, self.session_id)

    @contextlib.asynccontextmanager
    async def intercept(self, url_pattern: str) -> AsyncIterator[Any]:
        """Requests matching ``url_pattern`` pause before they are sent (``Fetch.requestPaused``
        params); each must be let go with ``Fetch.continueRequest``."""
        async with self.subscribe("Fetch.requestPaused") as paused:
            await self.send("Fetch.enable", {"patterns": [{"urlPattern": url_pattern,
                                                           "requestStage": "Request"}]})
            try:
                yield paused
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self.send("Fetch.disable")  # lets whatever is still paused go

    async def navigate(self, url: str) -> None:
        async with self.browser.subscribe("Page.loadEventFired", self.session_id) as loaded:
            await self.send("Page.navigate", {"url": url})
            await loaded.receive()


class Browser:
    def __init__(self, writer: FileWriteStream, tg: TaskGroup) -> None:
        self._writer = writer
        self._tg = tg
        self._next = 0
        self._pending: dict[int, MemoryObjectSendStream[dict[str, Any]]] = {}
        self._subs: list[tuple[str, str | None, MemoryObjectSendStream[dict[str, Any]]]] = []
        self.console: list[str] = []

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   session_id: str | None = None) -> Any:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session_id is not None:
            msg["sessionId"] = session_id
        send, recv = anyio.create_memory_object_stream[dict[str, Any]](1)
        self._pending[self._next] = send
        with send, recv:
            await self._writer.send(json.dumps(msg).encode() + b"\0")
            reply = await recv.receive()
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    @contextlib.asynccontextmanager
    async def subscribe(self, method: str, session_id: str | None = None
                        ) -> AsyncIterator[Any]:
        send, recv = anyio.create_memory_object_stream[dict[str, Any]](100)
        entry = (method, session_id, send)
        self._subs.append(entry)
        try:
            with send, recv:
                yield recv
        finally:
            self._subs.remove(entry)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            target = self._pending.pop(msg["id"], None)
            if target is not None:
                target.send_nowait(msg)
            return
        method = msg.get("method")
        if method == "Runtime.consoleAPICalled":
            args = msg["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
        for want, sid, send in self._subs:
            if want == method and (sid is None or sid == msg.get("sessionId")):
                with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                    send.send_nowait(msg.get("params", {}))

    async def read_loop(self, reader: FileReadStream) -> None:
        buf = b""
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
            while True:
                buf += await reader.receive()
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    self._dispatch(json.loads(raw))

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                             "flatten": True})
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page


def _pipe() -> tuple[int, int]:
    """A pipe whose fds are above 4, so placing one end on fd 3 or 4 cannot clobber the
    other."""
    r, w = os.pipe()
    high = (fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 10))
    os.close(r)
    os.close(w)
    return high


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    binary = chromium_binary()
    assert binary is not None
    cmd_r, cmd_w = _pipe()  # we write commands; the browser reads them on its fd 3
    evt_r, evt_w = _pipe()  # the browser writes on its fd 4; we read
    profile = tempfile.mkdtemp(prefix="eventcore-chromium-")
    args = [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
            "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--mute-audio",
            f"--user-data-dir={profile}", "about:blank"]
    # place the pipe ends on fds 3 and 4, then become the browser
    launcher = (f"import os, sys; os.dup2({cmd_r}, 3); os.dup2({evt_w}, 4); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    proc = await anyio.open_process([sys.executable, "-c", launcher, *args],
                                    pass_fds=(cmd_r, evt_w), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(cmd_r)
    os.close(evt_w)
    writer = FileWriteStream(os.fdopen(cmd_w, "wb", buffering=0))
    reader = FileReadStream(os.fdopen(evt_r, "rb", buffering=0))
    try:
        async with anyio.create_task_group() as tg:
            browser = Browser(writer, tg)
            tg.start_soon(browser.read_loop, reader)
            try:
                yield browser
            finally:
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(5), contextlib.suppress(Exception):
                        await browser.send("Browser.close")
                    with anyio.move_on_after(5):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()  # its pipe then ends, which ends read_loop's read
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()
            await writer.aclose()
            await reader.aclose()
        shutil.rmtree(profile, ignore_errors=True)
