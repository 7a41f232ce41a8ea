"""An incremental ``text/event-stream`` parser (the WHATWG rules the client needs)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SseEvent", "SseParser"]


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None
    retry_ms: int | None


class SseParser:
    """Feed it lines (without their end of line); it returns the events a blank line ends.
    Comment lines (``: ping``) are ignored; an event without data is not dispatched."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data and self._id is None:
                self._event, self._retry = "", None
                return None
            ev = SseEvent(self._event or "message", "\n".join(self._data), self._id,
                          self._retry)
            self._event, self._data, self._id, self._retry = "", [], None, None
            return ev
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None
