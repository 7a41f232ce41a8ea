"""The App: a registry of agents (name -> handler and its policies)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eventcore import validate_key
from eventcore.errors import ConfigError

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["AgentSpec", "App", "Handler", "RetryPolicy"]

Handler = Callable[["Session"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failing handler is retried: up to ``max_attempts`` attempts in all, waiting
    ``backoff_s * 2**(n-1)`` (capped at ``max_backoff_s``) before attempt ``n+1``, with full
    jitter (a uniform random fraction of that) so a failing fleet does not retry in lockstep."""

    max_attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("backoff_s and max_backoff_s must be >= 0")

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return random.uniform(0, cap) if self.jitter else cap


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One registered agent. ``None`` limits fall back to the worker's defaults."""

    name: str
    handler: Handler
    retry: RetryPolicy | None = None
    run_timeout_s: float | None = None
    session_timeout_s: float | None = None
    idle_timeout_s: float | None = None


class App:
    """Agents by name. ``@app.agent("name")`` registers a handler; a worker hosts sessions of
    every registered agent."""

    def __init__(self) -> None:
        self._agents: dict[str, AgentSpec] = {}

    def agent(
        self,
        name: str,
        *,
        retry: RetryPolicy | None = None,
        run_timeout_s: float | None = None,
        session_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> Callable[[Handler], Handler]:
        validate_key(name, "agent name")
        for what, v in (("run_timeout_s", run_timeout_s), ("session_timeout_s",
                        session_timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if v is not None and v <= 0:
                raise ConfigError(f"{what} must be > 0, got {v}")

        def register(handler: Handler) -> Handler:
            if name in self._agents:
                raise ConfigError(f"agent {name!r} is already registered")
            self._agents[name] = AgentSpec(name, handler, retry, run_timeout_s,
                                           session_timeout_s, idle_timeout_s)
            return handler

        return register

    def get(self, name: str) -> AgentSpec | None:
        return self._agents.get(name)

    @property
    def agents(self) -> dict[str, AgentSpec]:
        return dict(self._agents)
