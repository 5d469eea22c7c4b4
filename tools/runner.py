"""Running the tool calls an agent asked for, inside its step.

Each call is validated against the tool's schema, handed a ``ToolContext`` carrying its
idempotency key (``task id : step : call index``) and only its own session's
credentials, called through its circuit breaker if it has one (``tools.breakers``), and
recorded as a ``tool_call`` and a ``tool_result`` audit event (with a ``breaker`` event
between them when the call changed its breaker's state).

The calls of one step may run at the same time (``tools_run``: bounded by
``AGENTS_TOOL_CONCURRENCY``), and a call's result may be recorded under its idempotency
key (``ToolCallRecord``) so that a step that runs again never asks for it twice (every
MCP tool, every call of a step with several).

The task's credentials never leave the tool run: while tools run they are masked in
every log line, and the run masks them in everything it hands back to the engine (the
events, the results that become checkpoint observations, and the exception of a failed
call, its message, chain and traceback), so the engine, the audit trail, dead letters
and the API only ever see ``[redacted]``.
"""

from __future__ import annotations

import contextvars
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import connections

from agents_project import tracing
from agents_project.errors import PermanentError, RetryableError, RetryLater, StepError
from agents_project.redaction import contains_secret, redact, secrets_scope
from audit.models import EventType
from tools.breakers import Transition, breaker_call
from tools.credentials import task_credentials
from tools.models import ToolCallRecord
from tools.registry import Tool, ToolCall, ToolContext, ToolFailed, ToolResult, find_tool

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
    # Called with the call index once a call's result is recorded (the engine's fault
    # point ``tool_recorded``, for the crash tests).
    on_recorded: Callable[[int], None] | None = None


@dataclass
class _Outcome:
    """What one call left: its audit events, and its result or the error it raised."""

    events: Events = field(default_factory=list)
    result: ToolResult | None = None
    error: Exception | None = None


def tools_run(run: ToolRun, calls: Sequence[ToolCall]) -> list[ToolResult]:
    """Run the calls of one step and return their results in order.

    One call runs in the step's thread. Several (a model's reply with many tool calls)
    run at the same time, at most ``AGENTS_TOOL_CONCURRENCY`` at once: each call of a
    ``parallel`` tool (read-only) on its own, the others one after another in their
    order, alongside; each with its own idempotency key and through its own breaker.

    A call's result is recorded under its idempotency key (``ToolCallRecord``) when its
    tool is ``recorded`` (every MCP tool) or it is one of several calls: a step that
    runs again (a crash, a retry after another call failed) reuses what was recorded and
    calls only the others. Their audit events follow the calls' order.

    The first failure in call order is raised (the engine classifies it); after a
    failure, the calls that run one after another stop there. With
    ``run.errors_as_results`` a ``PermanentError`` becomes that call's failed result.
    """
    if not calls:
        return []
    many = len(calls) > 1
    tools = [find_tool(call.name, owner_id=run.owner_id) for call in calls]
    if run.credentials is None and any(t is None or t.credentials for t in tools):
        loaded = task_credentials(run.task_id, run.owner_id)
        run.credentials = {name: value for name, (value, _) in loaded.items()}
        run.credential_hosts = {name: hosts for name, (_, hosts) in loaded.items()}
    secrets = tuple(v for v in (run.credentials or {}).values() if v)
    keys = [_key(run, index) for index in range(len(calls))]
    recorded = _recorded(
        [k for k, t in zip(keys, tools, strict=True) if t and (t.recorded or many)]
    )

    def attempt(index: int) -> _Outcome:
        tool = tools[index]
        record = tool is not None and (tool.recorded or many)
        return _attempt(run, index, calls[index], tool, secrets, record, recorded.get(keys[index]))

    outcomes: list[_Outcome | None]
    if many and settings.AGENTS["TOOL_CONCURRENCY"] > 1:
        outcomes = _concurrently(run, secrets, tools, attempt)
    else:
        outcomes = []
        with secrets_scope(secrets):
            for index in range(len(calls)):
                outcome = attempt(index)
                outcomes.append(outcome)
                if outcome.error is not None:
                    break
    done = [outcome for outcome in outcomes if outcome is not None]
    for outcome in done:
        run.events.extend(outcome.events)
    for outcome in done:
        if outcome.error is not None:
            raise outcome.error
    return [outcome.result for outcome in done if outcome.result is not None]


def _key(run: ToolRun, index: int) -> str:
    return f"{run.task_id}:{run.step}:{index}"


def _recorded(keys: list[str]) -> dict[str, ToolCallRecord]:
    """The records of these calls, by idempotency key (one query; none if no keys)."""
    if not keys:
        return {}
    return {r.idempotency_key: r for r in ToolCallRecord.objects.filter(idempotency_key__in=keys)}


def _concurrently(
    run: ToolRun,
    secrets: tuple[str, ...],
    tools: list[Tool | None],
    attempt: Callable[[int], _Outcome],
) -> list[_Outcome | None]:
    """Run each ``parallel`` tool's call in a lane of its own and the others in one lane,
    in order, stopping at its first failure; at most ``AGENTS_TOOL_CONCURRENCY`` lanes at
    a time. Each lane's thread has its own database connection, closed when it ends."""
    serial = [i for i, tool in enumerate(tools) if tool is None or not tool.parallel]
    lanes = [[i] for i, tool in enumerate(tools) if tool is not None and tool.parallel]
    if serial:
        lanes.insert(0, serial)
    outcomes: list[_Outcome | None] = [None] * len(tools)
    context = structlog.contextvars.get_contextvars()

    def lane(indices: list[int]) -> None:
        try:
            with secrets_scope(secrets), structlog.contextvars.bound_contextvars(**context):
                for index in indices:
                    outcome = outcomes[index] = attempt(index)
                    if outcome.error is not None:
                        break
        finally:
            connections.close_all()

    workers = max(min(settings.AGENTS["TOOL_CONCURRENCY"], len(lanes)), 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"tools-{run.step}") as pool:
        # Each lane runs in a copy of this thread's context (its span, its log fields).
        submitted = [pool.submit(contextvars.copy_context().run, lane, i) for i in lanes]
        for future in submitted:
            future.result()
    return outcomes


def _attempt(
    run: ToolRun,
    index: int,
    call: ToolCall,
    tool: Tool | None,
    secrets: tuple[str, ...],
    record: bool,
    recorded: ToolCallRecord | None,
) -> _Outcome:
    outcome = _Outcome()
    try:
        if not tracing.ENABLED:
            outcome.result = _call(
                run, index, call, tool, secrets, outcome.events, record, recorded
            )
            return outcome
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
            outcome.result = _call(
                run, index, call, tool, secrets, outcome.events, record, recorded
            )
    except PermanentError as exc:
        if run.errors_as_results:
            outcome.result = ToolResult(name=call.name, args=call.args, ok=False, error=str(exc))
        else:
            outcome.error = exc
    except Exception as exc:
        outcome.error = exc
    return outcome


def _call(
    run: ToolRun,
    index: int,
    call: ToolCall,
    tool: Tool | None,
    secrets: tuple[str, ...],
    events: Events,
    record: bool,
    recorded: ToolCallRecord | None,
) -> ToolResult:
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
        events.append((event_type, redact(payload, secrets=secrets)))

    emit(
        EventType.TOOL_CALL,
        {
            "tool": tool.name,
            "args": args,
            "call_index": index,
            "idempotency_key": ctx.idempotency_key,
        },
    )
    if recorded is not None:
        # Asked for by an earlier run of this step and recorded: never asked again.
        emit(
            EventType.TOOL_RESULT,
            {
                "tool": tool.name,
                "call_index": index,
                "ok": recorded.ok,
                **({"value": recorded.value} if recorded.ok else {"error": recorded.error}),
                "duration_ms": recorded.duration_ms,
                "reused": True,
            },
        )
        if not recorded.ok:
            raise ToolFailed(recorded.error)
        return ToolResult(
            name=tool.name, args=redact(args, secrets=secrets), ok=True, value=recorded.value
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
        if record and isinstance(exc, ToolFailed):
            _record(run, index, tool, ok=False, value=None, error=str(error), started=started)
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
    if record:
        value = _record(run, index, tool, ok=True, value=value, error="", started=started)
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


def _record(
    run: ToolRun, index: int, tool: Tool, *, ok: bool, value: Any, error: str, started: float
) -> Any:
    """Store the call's result under its key at once (its own statement, no transaction
    of the step's is open) and return the value recorded: a concurrent copy of the step
    that recorded first wins, so every copy goes on with the same result."""
    record, _ = ToolCallRecord.objects.get_or_create(
        idempotency_key=_key(run, index),
        defaults={
            "task_id": run.task_id,
            "owner_id": run.owner_id,
            "tool": tool.name,
            "ok": ok,
            "value": value,
            "error": error,
            "duration_ms": _ms_since(started),
        },
    )
    if run.on_recorded is not None:
        run.on_recorded(index)
    return record.value


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
