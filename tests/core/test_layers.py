"""The error tree is closed: every exception the packages define derives from EventcoreError,
the public ones live in ``eventcore.errors``, and ``eventcore`` re-exports all of them."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import eventcore
from eventcore import errors

PACKAGES = ("eventcore", "eventcore.sinks", "eventcore.subscribers", "eventcore.workers",
            "eventcore.server", "eventcore.client")

# Control flow that never leaves its layer (the module that raises it also catches it), so it
# stays next to its one use. Anything else is part of the tree in errors.py.
INTERNAL = {
    "eventcore.server._http._problems.Problem",  # becomes the problem+json response
    "eventcore.server._webrtc_wire.Closed",  # the data channel closed: the stream ends
    "eventcore.server._webrtc_wire.Stalled",  # the peer stopped reading: the gateway drops it
    "eventcore.server._http._ws.WsClosed",  # the WebSocket closed or stalled: the stream ends
}


# The service's own HTTP error (status + problem+json body), raised by user routes too: part of
# eventcore.server's API, still an EventcoreError.
SERVER_PUBLIC = {"eventcore.server._http._problems.Problem"}
# The HTTP client's errors (an answer's status + problem document, or the service unreachable):
# eventcore.client's API, every one a ClientError and so an EventcoreError; the ones with a core
# meaning are also that core error (NotFound is a SessionNotFound, Conflict a SessionEnded,
# InvalidRequest a ValidationError). The core never raises them: they stay with the client.
CLIENT_PUBLIC = {f"eventcore.client._errors.{name}" for name in (
    "ApiError", "ClientError", "Conflict", "ConnectionLost", "Forbidden", "InvalidRequest",
    "NotFound", "ServiceUnavailable", "Unauthorized")}


def _modules() -> list[ModuleType]:
    mods = []
    for name in PACKAGES[:1]:
        pkg = importlib.import_module(name)
        mods.append(pkg)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            if info.name.rsplit(".", 1)[-1] != "__main__":
                mods.append(importlib.import_module(info.name))
    return mods


def _exception_classes() -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    mods = _modules()
    # the walk reaches the leaf modules
    assert {m.__name__ for m in mods} >= {"eventcore.subscribers._ordered",
                                          "eventcore.server._http._problems"}
    for mod in mods:
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.split(".")[0] == "eventcore":
                found.add(obj)
    return found


def test_every_exception_derives_from_eventcore_error() -> None:
    classes = _exception_classes()
    strays = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes
                    if not issubclass(c, errors.EventcoreError))
    assert strays == []


def test_public_exceptions_live_in_errors() -> None:
    # Exceptions outside errors.py are internal control flow: never part of a package's API.
    outside = []
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        for attr in pkg.__all__:
            obj = getattr(pkg, attr)
            if inspect.isclass(obj) and issubclass(obj, BaseException) \
                    and obj.__module__ != "eventcore.errors" \
                    and f"{obj.__module__}.{obj.__qualname__}" not in SERVER_PUBLIC | CLIENT_PUBLIC:
                outside.append(f"{name}.{attr} (defined in {obj.__module__})")
    assert outside == []
    elsewhere = sorted(name for c in _exception_classes() if c.__module__ != "eventcore.errors"
                       and not c.__name__.startswith("_")
                       and (name := f"{c.__module__}.{c.__qualname__}")
                       not in INTERNAL | CLIENT_PUBLIC)
    assert elsewhere == []


def test_errors_all_is_complete_and_reexported() -> None:
    defined = {n for n, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == "eventcore.errors"}
    assert defined == set(errors.__all__)
    missing = [n for n in errors.__all__
               if getattr(eventcore, n, None) is not getattr(errors, n)
               or n not in eventcore.__all__]
    assert missing == []
