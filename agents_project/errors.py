"""The application's one error type, mapped once to HTTP (see agents.api) and CLI errors.

Services raise these; views, commands and admin actions never invent their own.
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
