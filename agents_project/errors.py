"""The project's two error hierarchies, each chosen by type, never by message text.

- ``ApplicationError``: a refusal the caller can act on, mapped once to HTTP (see
  ``agents.api``) and CLI errors. Services raise these; views, commands and admin
  actions never invent their own.
- ``StepError``: why a step or a tool call did not finish, which the step engine
  classifies (``agents.errors`` re-exports them for agent authors):

  - ``RetryableError`` (and any exception not listed here): the step is retried with
    exponential backoff and jitter, up to the agent's ``max_retries``; after the last
    attempt the task is dead-lettered.
  - ``RetryLater``: the step is retried after ``delay`` seconds without spending an
    attempt (``CircuitOpen``, an open circuit breaker: waiting is the right answer).
  - ``PermanentError``: retrying cannot help (bad arguments, a refused request); the
    task ends ``failed`` at once.
"""

from __future__ import annotations

from typing import Any


class ApplicationError(Exception):
    """A refusal the caller can act on: bad input, missing object, conflicting state."""

    status_code = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.message}
        if self.field:
            body["field"] = self.field
        body.update(self.extra)
        return body


class InvalidInput(ApplicationError):
    """Input that can never succeed as sent; ``field`` names what is wrong."""


class NotFound(ApplicationError):
    status_code = 404
    code = "not_found"


class Forbidden(ApplicationError):
    """The caller may see the object but not do this to it (a permission is missing)."""

    status_code = 403
    code = "forbidden"


class Conflict(ApplicationError):
    """The request is well formed but the object's current state refuses it."""

    status_code = 409
    code = "conflict"


class IllegalTransition(Conflict):
    code = "illegal_transition"


class Backpressure(ApplicationError):
    """The broker cannot take more work now; nothing was created. Try again later."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- Why a step did not finish ------------------------------------------------------------


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
