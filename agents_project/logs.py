"""Structured logging: every line is key=value pairs, with the task id when there is one.

Code logs through ``structlog.get_logger(__name__)``; the step engine binds ``task_id``
and ``step`` to the context for the length of a step, so every line it causes says
which task it is about, including lines from Celery and Django, and with tracing on its
trace id (``agents_project.tracing.add_trace_id``). While a task's tools
run, its credentials are masked in every line (``mask_secrets``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from structlog.typing import Processor

from agents_project.redaction import active_secrets, contains_secret, redact
from agents_project.tracing import add_trace_id

_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    # The trace id on every line about a task, when tracing is on.
    add_trace_id,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def mask_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    """Mask the running task's credentials anywhere in the line, tracebacks included.

    It runs in structlog's chain (so this project's lines reach no handler unmasked)
    and again in the formatter, which also covers the standard-library lines of Celery
    and of libraries a tool uses (httpx logs every URL it requests).
    """
    secrets = active_secrets()
    if not secrets:
        return event_dict
    return {key: _masked(value, secrets) for key, value in event_dict.items()}


def _masked(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str | dict | list | tuple):
        return redact(value, secrets=secrets)
    text = repr(value)
    return redact(text, secrets=secrets) if contains_secret(text, secrets) else value


# The longest log line written, in characters: a huge request, value or traceback (a
# RecursionError's is ~150 KB) is cut, with a note of how much was left out.
MAX_LINE = 16 * 1024


class BoundedRenderer:
    """``KeyValueRenderer``, then the line cut to ``MAX_LINE`` characters."""

    def __init__(self, renderer: Any, limit: int = MAX_LINE) -> None:
        self.renderer = renderer
        self.limit = limit

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        line = str(self.renderer(logger, method_name, event_dict))
        if len(line) <= self.limit:
            return line
        return f"{line[: self.limit]} ...[{len(line) - self.limit} more characters]"


def formatter() -> logging.Formatter:
    """The one formatter of the project's log handler (referenced from LOGGING)."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            mask_secrets,
            BoundedRenderer(
                structlog.processors.KeyValueRenderer(
                    key_order=[
                        "timestamp",
                        "level",
                        "logger",
                        "event",
                        "task_id",
                        "step",
                        "trace_id",
                    ],
                    drop_missing=True,
                )
            ),
        ],
        foreign_pre_chain=_SHARED,
    )


structlog.configure(
    # Masked here too, so that no handler ever receives this project's lines unmasked.
    processors=[*_SHARED, mask_secrets, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)
