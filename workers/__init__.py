"""workers: the coroutine pool that hosts sessions from the dispatch streams.

Register agents on an :class:`App`, run a :class:`Worker` (or ``eventcore worker APP``), and
every session created for one of those agents is hosted by exactly one worker at a time.
"""

from ._app import AgentSpec, App, Handler, RetryPolicy
from ._control import DeadLetter, cancel, dead_letters
from ._harness import AgentRun, run_agent
from ._metrics import WorkerMetrics
from ._session import Run, Session
from ._worker import Worker

__all__ = [
    "AgentRun",
    "AgentSpec",
    "App",
    "DeadLetter",
    "Handler",
    "RetryPolicy",
    "Run",
    "Session",
    "Worker",
    "WorkerMetrics",
    "cancel",
    "dead_letters",
    "run_agent",
]
