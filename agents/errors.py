"""Why a step did not finish, chosen by type and never by message text.

An agent's step or a tool raises one of these; the step engine decides what happens:

- ``RetryableError`` (and any exception not listed here): the step is retried with
  exponential backoff and jitter, up to the agent's ``max_retries``; after the last
  attempt the task is dead-lettered.
- ``RetryLater``: the step is retried after ``delay`` seconds without spending an
  attempt (``CircuitOpen``, an open circuit breaker: waiting is the right answer).
- ``PermanentError``: retrying cannot help (bad arguments, a refused request); the task
  ends ``failed`` at once.
"""

from __future__ import annotations


class StepError(Exception):
    """Base of the errors the engine classifies."""


class RetryableError(StepError):
    """A transient failure: the same step may succeed if run again.

    ``max_retries``, when given, caps the retries for this failure below the agent's
    own budget (a tool's retry policy).
    """

    def __init__(self, message: str, *, max_retries: int | None = None) -> None:
        super().__init__(message)
        self.max_retries = max_retries


class RetryLater(RetryableError):
    """Run the step again after ``delay`` seconds; does not count as a failed attempt."""

    def __init__(self, message: str, *, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class CircuitOpen(RetryLater):
    """A tool's dependency is known to be down: its circuit breaker is open.

    The step waits ``delay`` seconds (the breaker's remaining open time) without
    spending an attempt, so an outage never burns a task's retries into the dead-letter
    queue. See ``tools.breakers``.
    """

    def __init__(self, breaker: str, *, delay: float, reason: str = "is open") -> None:
        super().__init__(
            f"circuit breaker {breaker!r} {reason}; retry in {delay:.1f} s", delay=delay
        )
        self.breaker = breaker


class PermanentError(StepError):
    """A failure that the same input will always produce."""


class ToolArgumentError(PermanentError):
    """A tool was called with arguments that do not fit its schema; names the field."""

    def __init__(self, tool: str, field: str, message: str) -> None:
        super().__init__(f"tool {tool!r}: {field}: {message}")
        self.tool = tool
        self.field = field
