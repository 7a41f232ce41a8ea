"""The JSONL file sink: one line per envelope, appended."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import anyio
import msgspec

from eventcore import client_json

from ._base import Published

__all__ = ["JsonlSink"]

_encode = msgspec.json.Encoder().encode


class JsonlSink:
    """Appends ``{"stream": ..., "seq": ..., "envelope": {...}}`` lines to ``path``.

    ``server_data`` is left out unless ``include_server_data`` (the file is often shipped
    somewhere less trusted than the server). ``fsync`` makes each ``send`` durable before it
    returns. Writes run in a worker thread so a slow disk never blocks the event loop; one
    ``send`` is one ``write`` call, so lines of concurrent sends do not interleave.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, include_server_data: bool = False,
        fsync: bool = False,
    ) -> None:
        self.path = Path(path)
        self.include_server_data = include_server_data
        self.fsync = fsync
        self._file: IO[bytes] | None = None
        self._lock = anyio.Lock()

    def _line(self, p: Published) -> bytes:
        env = _encode(p.envelope) if self.include_server_data else client_json(p.envelope)
        return b'{"stream":%s,"seq":%d,"envelope":%s}\n' % (_encode(p.stream), p.seq, env)

    def _write(self, data: bytes) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across sends
        self._file.write(data)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    async def send(self, envelopes: Sequence[Published]) -> None:
        if not envelopes:
            return
        data = b"".join(self._line(p) for p in envelopes)
        async with self._lock:
            await anyio.to_thread.run_sync(self._write, data)

    async def aclose(self) -> None:
        async with self._lock:
            if self._file is not None:
                await anyio.to_thread.run_sync(self._file.close)
                self._file = None
