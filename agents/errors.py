"""Why a step did not finish: the errors an agent's step or a tool raises, which the
step engine classifies by type (``agents_project.errors`` defines them; see its
docstring for what each one makes the engine do).

- ``RetryableError``: retried with backoff, then dead-lettered;
- ``RetryLater``: retried after ``delay`` seconds without spending an attempt
  (``CircuitOpen``: an open circuit breaker);
- ``PermanentError`` (``ToolArgumentError``): the task fails at once.
"""

from agents_project.errors import (
    CircuitOpen,
    PermanentError,
    RetryableError,
    RetryLater,
    StepError,
    ToolArgumentError,
)

__all__ = [
    "CircuitOpen",
    "PermanentError",
    "RetryLater",
    "RetryableError",
    "StepError",
    "ToolArgumentError",
]
