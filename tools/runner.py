"""Running the tool calls an agent asked for, inside its step.

Each call is validated against the tool's schema, handed a ``ToolContext`` carrying its
idempotency key (``task id : step : call index``) and only its own session's
credentials, called through its circuit breaker if it has one (``tools.breakers``), and
recorded as a ``tool_call`` and a ``tool_result`` audit event (with a ``breaker`` event
between them when the call changed its breaker's state).

The task's credentials never leave the tool run: while tools run they are masked in
every log line, and the run masks them in everything it hands back to the engine (the
events, the results that become checkpoint observations, and the exception of a failed
call, its message, chain and traceback), so the engine, the audit trail, dead letters
and the API only ever see ``[redacted]``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from uuid import UUID

from agents_project import tracing
from agents_project.errors import PermanentError, RetryableError, RetryLater, StepError
from agents_project.redaction import contains_secret, redact, secrets_scope
from audit.models import EventType
from tools.breakers import Transition, breaker_call
from tools.credentials import task_credentials
from tools.registry import Tool, ToolCall, ToolContext, ToolResult, find_tool

Events = list[tuple[str, dict[str, Any]]]


@dataclass
class ToolRun:
    """The tool calls of one step: whose they are, and where their events go."""

    task_id: UUID
    owner_id: int
    step: int
    events: Events
    # This task's decrypted credentials by name; None: read when the first tool runs,
    # so that a step calling no tool never decrypts anything.
    credentials: Mapping[str, str] | None = None
    # The hosts each credential is bound to (read with the credentials).
    credential_hosts: Mapping[str, tuple[str, ...]] | None = None
    # A permanent error of a tool becomes that call's failed result, for the agent to
    # read next step (an LLM agent shows it to the model), instead of failing the task.
    errors_as_results: bool = False


def tools_run(run: ToolRun, calls: Sequence[ToolCall]) -> list[ToolResult]:
    """Call each tool in order; raise the first failure (the engine classifies it), or
    with ``run.errors_as_results`` turn a ``PermanentError`` into a failed result."""
    if not calls:
        return []
    if run.credentials is None:
        loaded = task_credentials(run.task_id, run.owner_id)
        run.credentials = {name: value for name, (value, _) in loaded.items()}
        run.credential_hosts = {name: hosts for name, (_, hosts) in loaded.items()}
    secrets = tuple(v for v in run.credentials.values() if v)
    with secrets_scope(secrets):
        return [_call_or_result(run, index, call, secrets) for index, call in enumerate(calls)]


def _call_or_result(
    run: ToolRun, index: int, call: ToolCall, secrets: tuple[str, ...]
) -> ToolResult:
    try:
        if not tracing.ENABLED:
            return _call(run, index, call, secrets)
        # A span per call (GenAI conventions), its error (already masked) recorded on it.
        with tracing.span(
            f"execute_tool {call.name}",
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": call.name,
                "gen_ai.tool.type": "function",
                "gen_ai.tool.call.id": f"{run.task_id}:{run.step}:{index}",
            },
        ):
            return _call(run, index, call, secrets)
    except PermanentError as exc:
        if not run.errors_as_results:
            raise
        return ToolResult(name=call.name, args=call.args, ok=False, error=str(exc))


def _call(run: ToolRun, index: int, call: ToolCall, secrets: tuple[str, ...]) -> ToolResult:
    tool = find_tool(call.name)
    if tool is None:
        raise PermanentError(f"unknown tool {call.name!r}")
    args = tool.validate(call.args)
    breaker = tool.breaker_for(args)
    ctx = ToolContext(
        task_id=run.task_id,
        owner_id=run.owner_id,
        step=run.step,
        call_index=index,
        timeout=tool.timeout,
        credentials=MappingProxyType(dict(run.credentials or {})),
        credential_hosts=MappingProxyType(dict(run.credential_hosts or {})),
    )

    def emit(event_type: str, payload: dict[str, Any]) -> None:
        run.events.append((event_type, redact(payload, secrets=secrets)))

    emit(
        EventType.TOOL_CALL,
        {
            "tool": tool.name,
            "args": args,
            "call_index": index,
            "idempotency_key": ctx.idempotency_key,
        },
    )
    transitions: list[Transition] = []
    started = time.monotonic()
    try:
        if breaker is None:
            value = tool.func(ctx, args)
        else:
            value = breaker_call(
                name=breaker,
                func=lambda: tool.func(ctx, args),
                trial_timeout=tool.timeout,
                transitions=transitions,
                owner_id=run.owner_id,
            )
    except Exception as exc:
        for transition in transitions:
            emit(EventType.BREAKER, transition.as_payload())
        error = _scrubbed(exc, secrets, tool)
        emit(
            EventType.TOOL_RESULT,
            {
                "tool": tool.name,
                "call_index": index,
                "ok": False,
                "error": str(error),
                "error_type": type(error).__name__,
                "duration_ms": _ms_since(started),
                # The breaker that failed fast (the owner's own or the shared one).
                **({"breaker": getattr(exc, "breaker", breaker)} if breaker else {}),
            },
        )
        if error is not exc:
            raise error from None
        if isinstance(exc, StepError):
            raise
        # Anything else a tool raises is transient until proven otherwise.
        raise RetryableError(
            f"tool {tool.name!r} failed: {exc!r}", max_retries=tool.max_retries
        ) from exc
    for transition in transitions:
        emit(EventType.BREAKER, transition.as_payload())
    value = redact(value, secrets=secrets)
    emit(
        EventType.TOOL_RESULT,
        {
            "tool": tool.name,
            "call_index": index,
            "ok": True,
            "value": value,
            "duration_ms": _ms_since(started),
        },
    )
    return ToolResult(name=tool.name, args=redact(args, secrets=secrets), ok=True, value=value)


def _scrubbed(exc: Exception, secrets: tuple[str, ...], tool: Tool) -> Exception:
    """``exc`` with the secrets masked in its message and its chain's, or, if one still
    shows in its traceback (an exception that renders its text from elsewhere), a new
    exception of the same kind carrying only the masked text."""
    if not secrets:
        return exc
    for link in _chain(exc):
        link.args = tuple(
            redact(arg, secrets=secrets) if isinstance(arg, str) else arg for arg in link.args
        )
    text = "".join(traceback.format_exception(exc))
    if not contains_secret(text, secrets):
        return exc
    message = redact(f"tool {tool.name!r} failed: {type(exc).__name__}: {exc}", secrets=secrets)
    if isinstance(exc, PermanentError):
        return PermanentError(message)
    if isinstance(exc, RetryLater):
        return RetryLater(message, delay=exc.delay)
    limit = exc.max_retries if isinstance(exc, RetryableError) else tool.max_retries
    return RetryableError(message, max_retries=limit)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
