"""Running the tool calls an agent asked for, inside its step.

Each call is validated against the tool's schema, handed a ``ToolContext`` carrying its
idempotency key (``task id : step : call index``) and only its own session's
credentials, and recorded as a ``tool_call`` and a ``tool_result`` audit event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from agents.definition import ToolCall, ToolResult
from agents.errors import PermanentError, RetryableError, StepError
from audit.models import EventType
from tools.registry import ToolContext, find_tool


@dataclass
class ToolRun:
    """The tool calls of one step: whose they are, and where their events go."""

    task_id: UUID
    owner_id: int
    step: int
    events: list[tuple[str, dict[str, Any]]]
    credentials: dict[str, str] = field(default_factory=dict)


def tools_run(run: ToolRun, calls: Sequence[ToolCall]) -> list[ToolResult]:
    """Call each tool in order; raise the first failure (the engine classifies it)."""
    results: list[ToolResult] = []
    for index, call in enumerate(calls):
        tool = find_tool(call.name)
        if tool is None:
            raise PermanentError(f"unknown tool {call.name!r}")
        args = tool.validate(call.args)
        ctx = ToolContext(
            task_id=run.task_id,
            owner_id=run.owner_id,
            step=run.step,
            call_index=index,
            timeout=tool.timeout,
            credentials=run.credentials,
        )
        run.events.append(
            (
                EventType.TOOL_CALL,
                {
                    "tool": tool.name,
                    "args": args,
                    "call_index": index,
                    "idempotency_key": ctx.idempotency_key,
                },
            )
        )
        started = time.monotonic()
        try:
            value = tool.func(ctx, args)
        except Exception as exc:
            run.events.append(
                (
                    EventType.TOOL_RESULT,
                    {
                        "tool": tool.name,
                        "call_index": index,
                        "ok": False,
                        "error": str(exc),
                        "error_type": type(exc).__name__,
                        "duration_ms": _ms_since(started),
                    },
                )
            )
            if isinstance(exc, StepError):
                raise
            # Anything else a tool raises is transient until proven otherwise.
            raise RetryableError(
                f"tool {tool.name!r} failed: {exc!r}", max_retries=tool.max_retries
            ) from exc
        run.events.append(
            (
                EventType.TOOL_RESULT,
                {
                    "tool": tool.name,
                    "call_index": index,
                    "ok": True,
                    "value": value,
                    "duration_ms": _ms_since(started),
                },
            )
        )
        results.append(ToolResult(name=tool.name, args=args, ok=True, value=value))
    return results


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
