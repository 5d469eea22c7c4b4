"""Structured logging: every line is key=value pairs, with the task id when there is one.

Code logs through ``structlog.get_logger(__name__)``; the step engine binds ``task_id``
and ``step`` to the context for the length of a step, so every line it causes says
which task it is about, including lines from Celery and Django.
"""

from __future__ import annotations

import logging

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def formatter() -> logging.Formatter:
    """The one formatter of the project's log handler (referenced from LOGGING)."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(
                key_order=["timestamp", "level", "logger", "event", "task_id", "step"],
                drop_missing=True,
            ),
        ],
        foreign_pre_chain=_SHARED,
    )


structlog.configure(
    processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)
