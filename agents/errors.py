"""Why a step did not finish, chosen by type and never by message text.

An agent's step or a tool raises one of these; the step engine decides what happens:

- ``RetryableError`` (and any exception not listed here): the step is retried with
  exponential backoff and jitter, up to the agent's ``max_retries``; after the last
  attempt the task is dead-lettered.
- ``RetryLater``: the step is retried after ``delay`` seconds without spending an
  attempt (an open circuit breaker: waiting is the right answer, not failing).
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


class PermanentError(StepError):
    """A failure that the same input will always produce."""


class ToolArgumentError(PermanentError):
    """A tool was called with arguments that do not fit its schema; names the field."""

    def __init__(self, tool: str, field: str, message: str) -> None:
        super().__init__(f"tool {tool!r}: {field}: {message}")
        self.tool = tool
        self.field = field
