"""The step engine: run a delivery of one step of one task, as its only live copy.

A delivery of ``(task id, step)`` goes through:

1. the claim (``agents.core.leases``): one read of the task and the previous step's
   checkpoint, then the lease, taken with a compare-and-swap on the fencing token. A
   delivery for a step that is not current, a duplicate of a step a live copy holds,
   or an early copy of a step waiting out its backoff is dropped here;
2. the deadline and, when this delivery took over the lease of a holder that died,
   the count of lost workers: either may end the task here;
3. the checkpoint of the previous step, migrated if older code wrote it; a step this
   worker cannot run (agent unknown, checkpoint newer than its code, the task pinned
   to another version of the agent: ``agents.core.versions``) is refused and parked
   until a worker that can run it sweeps it;
4. the agent's ``step``, then the tools it asked for, each with the idempotency key
   ``task id : step : call index``; no database transaction is open meanwhile, a
   heartbeat renews the lease, and an alarm stops the step at the task's deadline;
5. the outcome is checked (every value JSON that PostgreSQL accepts) before anything
   is written;
6. the commit (``agents.core.commit``): one transaction, fenced, writes the checkpoint
   and every audit event, advances the task (its status only through the state
   machine) and publishes the next step before it commits.

Anything raised at any of these points is a step error: audited, counted as an
attempt, and retried, failed or dead-lettered by one policy (``agents.core.retries``).
A database outage is not a step error: the step waits for the database, holding its
message, and gives the message back if the outage outlasts ``AGENTS_DATABASE_PATIENCE``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections
from django.db.models import TextField
from django.db.models.functions import Cast

from agents import metrics
from agents.core import children, clock, suspensions
from agents.core.commit import (
    ChainHead,
    StepRecord,
    steps_commit,
    steps_commit_hand_off,
    worker_actor,
)
from agents.core.dispatch import step_time_limits
from agents.core.faults import fault_point
from agents.core.handoffs import step_hand_off
from agents.core.leases import (
    Claim,
    DeadlineReached,
    Verdict,
    deadline_alarm,
    lease_claim,
    lease_held,
    lease_owner_name,
    lease_release_later,
)
from agents.core.results import StepResult
from agents.core.retries import (
    retry_or_dead_letter,
    schedule_retry,
    step_fail,
    step_refuse,
    worker_loss_record,
)
from agents.definition import (
    Agent,
    CallTools,
    Continue,
    Fail,
    Finish,
    HandOff,
    Outcome,
    Resumption,
    StartChildren,
    StepContext,
    Suspend,
    ToolResult,
    registered_agents,
)
from agents.errors import PermanentError, RetryLater
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents_project import tracing
from agents_project.errors import Backpressure
from agents_project.validation import json_path_check
from audit.models import EventType
from tools.registry import tool_owner
from tools.runner import ToolRun, tools_run

logger = structlog.get_logger(__name__)

DATABASE_ERRORS = (OperationalError, InterfaceError)
_NO_SPAN = contextlib.nullcontext()


def step_execute(
    *,
    task_id: UUID,
    step: int,
    message: Mapping[str, Any] | None = None,
    node: str = "local",
    published_at: float | None = None,
    handed_back: Mapping[str, Any] | None = None,
    traceparent: str = "",
    owner: str | None = None,
) -> StepResult:
    """Run ``step`` of the task once, as its only live copy. Safe to call any number of
    times, concurrently, for the same step: at most one call runs the agent's code at a
    time, and only a call that holds the lease commits.

    ``node`` is the Celery node name of the calling worker (for ``leases_hand_back``);
    ``published_at`` the time (``time.time()``) its message was published, for the
    time-in-queue metric; ``handed_back`` what a hand-off's process said of this step
    (``agents.core.handoffs``), for the step's ``StepContext``; ``traceparent`` the
    trace context its message carried (``agents_project.tracing.step_parent``);
    ``owner`` the lease owner name of a caller that holds the step's lease already (the
    model gateway continuing a step it took a reply for: its claim takes its own lease
    on); default a new ``lease_owner_name(node)``.
    Retries are scheduled in the database (``agents.core.retries``), not by raising. A
    ``DEAD_LETTERED`` result tells the Celery task to reject its message into the
    dead-letter queue; ``REQUEUE`` to give it back (the database stayed away longer
    than ``AGENTS_DATABASE_PATIENCE`` seconds).
    """
    owner = owner or lease_owner_name(node)
    with structlog.contextvars.bound_contextvars(task_id=str(task_id), step=step):
        waited, delay = 0.0, 0.5
        while True:
            try:
                return _execute(
                    task_id,
                    step,
                    dict(message or {}),
                    owner,
                    published_at,
                    handed_back,
                    traceparent,
                )
            except DATABASE_ERRORS as exc:
                # The database is restarting or unreachable. Nothing can progress without
                # it, so this step holds its message and waits, rather than failing a
                # task over an outage. Running the claim again is safe: this delivery
                # owns its lease under ``owner`` and takes it back.
                if waited >= settings.AGENTS["DATABASE_PATIENCE"]:
                    logger.error("database unavailable too long; message given back")
                    # Its redelivery must not be taken for a death: release the lease
                    # as soon as the database answers again.
                    lease_release_later(task_id=task_id, owner=owner)
                    return StepResult.REQUEUE
                logger.warning("database unavailable; the step waits", error=repr(exc))
                with contextlib.suppress(*DATABASE_ERRORS):
                    connections.close_all()
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)


_DROPPED = {
    Verdict.STALE: "stale delivery dropped",
    Verdict.DUPLICATE: "duplicate delivery dropped; a live copy holds the step",
    Verdict.EARLY: "early delivery dropped; a retry is pending",
    Verdict.UNKNOWN: "delivery for an unknown task dropped",
}


def _execute(
    task_id: UUID,
    step: int,
    message: dict[str, Any],
    owner: str,
    published_at: float | None,
    handed_back: Mapping[str, Any] | None,
    traceparent: str,
) -> StepResult:
    claim = lease_claim(task_id=task_id, step=step, owner=owner)
    if claim.verdict in _DROPPED:
        logger.info(_DROPPED[claim.verdict])
        return StepResult.STALE
    if claim.verdict == Verdict.UNDECIDED:
        logger.info("early delivery given back; the step before it may still commit")
        return StepResult.REQUEUE
    if claim.verdict == Verdict.OVERDUE:
        suspensions.task_time_out(task_id=task_id, actor=worker_actor())
        return StepResult.TIMED_OUT
    task, fence = claim.task, claim.fence
    assert task is not None
    if claim.took_over and worker_loss_record(
        task_id=task_id, step=step, fence=fence, message=message, actor=worker_actor()
    ):
        return StepResult.DEAD_LETTERED
    agent = registered_agents().get(task.agent_name)
    if agent is None:
        step_refuse(
            task_id=task_id,
            step=step,
            fence=fence,
            needs_state_version=0,
            reason=f"agent {task.agent_name!r} is not registered in this worker",
            actor=worker_actor(),
        )
        return StepResult.REFUSED
    with _step_span(task, agent, step, traceparent):
        result = _held(claim, agent, step, message, published_at, owner, handed_back)
        if tracing.ENABLED:
            tracing.attributes_set({"agents.step.result": result.value})
        return result


def _step_span(
    task: AgentTask, agent: Agent, step: int, traceparent: str
) -> contextlib.AbstractContextManager[Any]:
    """The step's span, ``invoke_agent {agent}`` (GenAI conventions), in the task's trace
    (``tracing.step_parent``); a shared null context when tracing is off."""
    if not tracing.ENABLED:
        return _NO_SPAN
    parent, links = tracing.step_parent(stored=task.trace_context, received=traceparent)
    return tracing.span(
        f"invoke_agent {agent.name}",
        kind="consumer",
        parent=parent or None,
        links=links,
        attributes={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent.name,
            "agents.agent.version": task.agent_version,
            "agents.task.id": str(task.pk),
            "agents.step": step,
            "agents.attempt": task.attempt + 1,
        },
    )


def _held(
    claim: Claim,
    agent: Agent,
    step: int,
    message: dict[str, Any],
    published_at: float | None,
    owner: str,
    handed_back: Mapping[str, Any] | None,
) -> StepResult:
    task, fence = claim.task, claim.fence
    assert task is not None
    task_id = task.pk
    with lease_held(task_id=task_id, fence=fence, owner=owner):
        try:
            return _run(claim, agent, step, message, published_at, owner, handed_back)
        except DeadlineReached:
            suspensions.task_time_out(task_id=task_id, actor=worker_actor())
            return StepResult.TIMED_OUT
        except DATABASE_ERRORS:
            raise
        except Exception as exc:
            # Anything raised outside the agent's own code (loading, migrating,
            # checking, committing) is a failed attempt like any other.
            logger.warning("step failed outside the agent's code", error=repr(exc))
            tracing.error_record(exc)
            metrics.step_failed(agent=agent.name, events=[])
            return retry_or_dead_letter(
                task_id=task_id,
                step=task.current_step,
                fence=fence,
                agent=agent,
                error=exc,
                events=[],
                message=message,
                actor=worker_actor(),
            )


def _run(
    claim: Claim,
    agent: Agent,
    step: int,
    message: dict[str, Any],
    published_at: float | None,
    owner: str,
    handed_back: Mapping[str, Any] | None,
) -> StepResult:
    task, checkpoint, fence = claim.task, claim.checkpoint, claim.fence
    assert task is not None
    task_id = task.pk
    if checkpoint is None:
        raise PermanentError(f"task {task_id} has no checkpoint {step - 1}")
    # Checkpoint 0 of schema version 0: the process that accepted the task runs another
    # version of the agent than the task's (``agents.core.versions``), so the worker of
    # the task's version computes the ``initial_state`` of the input itself.
    fresh = checkpoint.step == 0 and checkpoint.schema_version == 0
    if checkpoint.schema_version > agent.state_version:
        step_refuse(
            task_id=task_id,
            step=step,
            fence=fence,
            needs_state_version=checkpoint.schema_version,
            reason=(
                f"checkpoint {step - 1} has state schema version {checkpoint.schema_version};"
                f" this worker's {agent.name} knows up to {agent.state_version}. The task is "
                "left untouched until a worker with newer code takes it."
            ),
            actor=worker_actor(),
        )
        return StepResult.REFUSED
    if not agent.runs_version(task.agent_version):
        # Pinned to another version of the agent (``agents.core.versions``): park the
        # step untouched; the sweep of a worker that serves the version publishes it.
        step_refuse(
            task_id=task_id,
            step=step,
            fence=fence,
            needs_state_version=0,
            reason=(
                f"the task runs {agent.name} version {task.agent_version}; this worker "
                f"serves version {agent.version}. The step waits for a worker of its version."
            ),
            actor=worker_actor(),
        )
        return StepResult.REFUSED
    audit_head = claim.audit_head
    if task.status == TaskStatus.PENDING:
        began, audit_head = suspensions.task_begin(
            task_id=task_id, actor=worker_actor(), head=audit_head, task=task
        )
        if not began:
            return StepResult.STALE
    if published_at is not None and not claim.took_over:
        # Publish to start, for agents_step_queue_seconds (a take-over's time includes
        # the copy that died, so it is left out).
        metrics.step_started(agent=agent.name, queued_seconds=time.time() - published_at)

    events: list[tuple[str, dict[str, Any]]] = []
    if fresh:
        state = agent.initial_state(_task_input(task_id))
    else:
        state = _migrate(agent, checkpoint, events)
    ctx = StepContext(
        task_id=task_id,
        step=step,
        attempt=task.attempt + 1,
        input=_task_input(task_id),
        state=state,
        owner_id=task.owner_id,
        tool_results=tuple(
            ToolResult(**r) for r in checkpoint.observations.get("tool_results", ())
        ),
        resumed=_resumption(task_id, step - 1, checkpoint),
        handed_back=handed_back,
        events=events,
    )
    if tracing.ENABLED and ctx.resumed is not None:
        tracing.event("agents.task.resumed", _resumed_attributes(ctx.resumed))
    per_delivery, commit_every = checkpoint_policy(agent)
    # The audit chain's head as the claim read it, then as each commit left it.
    chain = ChainHead(audit_head)
    done: list[StepRecord] = []
    while True:
        try:
            record = _step_once(agent, ctx, task.deadline, events)
        except DeadlineReached:
            if done:
                _commit_part(task, fence, agent, done, chain)
            raise
        except HandOff as handoff:
            if done:
                # The steps before it and the hand-off in one transaction where it can.
                payload = _handoff_payload(task, agent, handoff)
                fused = steps_commit_hand_off(
                    task_id, fence, agent, done, chain=chain, payload=payload
                )
                if fused == StepResult.COMMITTED:
                    metrics.step_handed_off(agent=agent.name)
                    return StepResult.HANDED_OFF
                if _commit_part(task, fence, agent, done, chain) != StepResult.COMMITTED:
                    return StepResult.STALE
            return _hand_off(task, ctx.step, fence, owner, agent, handoff)
        except Exception as exc:
            # The steps of this delivery before this one succeeded: keep them first.
            if done and _commit_part(task, fence, agent, done, chain) != StepResult.COMMITTED:
                return StepResult.STALE
            return _step_failed(task_id, ctx.step, fence, agent, exc, events, message)
        done.append(record)
        goes_on = isinstance(record.outcome, Continue) or (
            isinstance(record.outcome, CallTools) and agent.continue_after_tools
        )
        if not (goes_on and ctx.step - step + 1 < per_delivery):
            return steps_commit(task_id, fence, agent, done, hand_on=True, chain=chain)
        if len(done) >= commit_every:
            if _commit_part(task, fence, agent, done, chain) != StepResult.COMMITTED:
                return StepResult.STALE
            done = []
        events = []
        ctx = StepContext(
            task_id=task_id,
            step=ctx.step + 1,
            attempt=1,
            input=_task_input(task_id),
            state=record.state,
            owner_id=task.owner_id,
            tool_results=tuple(record.results),
            continued=True,
            events=events,
        )


def _hand_off(
    task: AgentTask, step: int, fence: int, owner: str, agent: Agent, handoff: HandOff
) -> StepResult:
    """End the delivery without a checkpoint, its wait handed to another process
    (``agents.core.handoffs``)."""
    payload = _handoff_payload(task, agent, handoff)
    try:
        handed = step_hand_off(
            task_id=task.pk, step=step, fence=fence, owner=owner, payload=payload
        )
    except Backpressure:
        # As in a database outage: the message goes back, the lease is released.
        lease_release_later(task_id=task.pk, owner=owner)
        return StepResult.REQUEUE
    if not handed:
        logger.info("hand-off dropped: the lease was lost")
        return StepResult.STALE
    metrics.step_handed_off(agent=agent.name)
    return StepResult.HANDED_OFF


def _handoff_payload(task: AgentTask, agent: Agent, handoff: HandOff) -> dict[str, Any]:
    """The hand-off's payload with ``deadline``: the time (``time.time()``) by which the
    wait must end, the step's hard time limit or the task's deadline."""
    _, hard = step_time_limits(agent)
    deadline = time.time() + hard
    if task.deadline is not None:
        deadline = min(deadline, time.time() + (task.deadline - clock.now()).total_seconds())
    return {**handoff.payload, "deadline": deadline}


def _commit_part(
    task: AgentTask, fence: int, agent: Agent, done: list[StepRecord], chain: ChainHead
) -> StepResult:
    """Commit some steps of a delivery that goes on (keeping its lease and message), and
    note on ``task`` where it now is, for a failure recorded later."""
    result = steps_commit(task.pk, fence, agent, done, hand_on=False, chain=chain)
    if result == StepResult.COMMITTED:
        task.current_step = done[-1].step + 1
    return result


def checkpoint_policy(agent: Agent) -> tuple[int, int]:
    """``(steps_per_delivery, commit_every)`` for ``agent``: its class attributes, or
    ``AGENTS_CHECKPOINT_POLICY[agent.name]``. Both at least 1; ``commit_every`` at most
    ``steps_per_delivery``."""
    override = settings.AGENTS["CHECKPOINT_POLICY"].get(agent.name, {})
    per_delivery = max(int(override.get("steps_per_delivery", agent.steps_per_delivery)), 1)
    commit_every = max(int(override.get("commit_every", agent.commit_every)), 1)
    return per_delivery, min(commit_every, per_delivery)


def _step_once(
    agent: Agent,
    ctx: StepContext,
    deadline: Any,
    events: list[tuple[str, dict[str, Any]]],
) -> StepRecord:
    """Run the agent's step and its tools, and check the outcome can be stored."""
    started = time.monotonic()
    tool_run = ToolRun(
        task_id=ctx.task_id,
        owner_id=ctx.owner_id,
        step=ctx.step,
        events=events,
        errors_as_results=agent.tool_errors_to_agent,
        on_recorded=lambda _index: fault_point("tool_recorded", step=ctx.step),
    )
    # The owner's view of the tool registry (its own MCP servers) for the agent's code.
    with deadline_alarm(deadline), tool_owner(ctx.owner_id):
        outcome = agent.step(ctx)
        if not isinstance(outcome, Continue | CallTools | Suspend | StartChildren | Finish | Fail):
            raise PermanentError(f"{agent.name}.step returned {outcome!r}, not an outcome")
        if isinstance(outcome, StartChildren):
            children.children_check(outcome)
        if outcome.reasoning:
            events.append((EventType.REASONING, {"text": outcome.reasoning}))
        if tracing.ENABLED and isinstance(outcome, Suspend):
            tracing.event("agents.task.suspended", _suspended_attributes(outcome))
        results = tools_run(tool_run, outcome.calls) if isinstance(outcome, CallTools) else []
        _check_storable(outcome, ctx.state, results, events)
    new_state = ctx.state if outcome.state is None else outcome.state
    duration_ms = round((time.monotonic() - started) * 1000, 3)
    return StepRecord(ctx.step, new_state, outcome, results, events, duration_ms)


def _step_failed(
    task_id: UUID,
    step: int,
    fence: int,
    agent: Agent,
    exc: Exception,
    events: list[tuple[str, dict[str, Any]]],
    message: dict[str, Any],
) -> StepResult:
    """Classify a failed step by its error's type (``agents.errors``)."""
    tracing.error_record(exc)
    if isinstance(exc, RetryLater):
        return schedule_retry(
            task_id=task_id,
            step=step,
            fence=fence,
            error=exc,
            delay=exc.delay,
            events=events,
            actor=worker_actor(),
        )
    metrics.step_failed(agent=agent.name, events=events)
    if isinstance(exc, PermanentError):
        return step_fail(
            task_id=task_id, step=step, fence=fence, error=exc, events=events, actor=worker_actor()
        )
    logger.warning("step attempt failed", error=repr(exc))
    return retry_or_dead_letter(
        task_id=task_id,
        step=step,
        fence=fence,
        agent=agent,
        error=exc,
        events=events,
        message=message,
        actor=worker_actor(),
    )


def _suspended_attributes(outcome: Suspend) -> dict[str, Any]:
    """The span event of a suspension: what the task waits for (the approval's question
    is left out: it may quote the conversation)."""
    kind = "approval" if outcome.approval else "event" if outcome.event else "timer"
    attributes: dict[str, Any] = {"agents.wait.kind": kind}
    if outcome.event:
        attributes["agents.wait.event"] = outcome.event
    if outcome.until is not None:
        attributes["agents.wait.until"] = outcome.until.isoformat()
    return attributes


def _resumed_attributes(resumed: Resumption) -> dict[str, Any]:
    """The span event of a resumption: how the wait ended, and who decided."""
    attributes: dict[str, Any] = {"agents.wait.kind": resumed.kind}
    if resumed.approved is not None:
        attributes["agents.approval.approved"] = resumed.approved
    if resumed.decided_by:
        attributes["agents.approval.decided_by"] = resumed.decided_by
    return attributes


def _check_storable(
    outcome: Outcome,
    state: Any,
    results: list[ToolResult],
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    """Refuse, before the commit, what PostgreSQL would refuse inside it (NaN, a set,
    a NUL character, an unpaired surrogate), naming where it is. The same check as the
    API's (``agents_project.validation``); raises ``PermanentError``."""
    if outcome.state is not None:
        json_path_check(outcome.state, path="state")
    else:
        json_path_check(state, path="state")
    for index, result in enumerate(results):
        json_path_check(result.value, path=f"tool_results[{index}].value")
        json_path_check(result.error, path=f"tool_results[{index}].error")
    if isinstance(outcome, Finish):
        json_path_check(outcome.result, path="result")
    if isinstance(outcome, Fail):
        json_path_check(outcome.error, path="error")
    if isinstance(outcome, Suspend):
        json_path_check(outcome.default, path="default")
    if isinstance(outcome, StartChildren):
        for index, spec in enumerate(outcome.children):
            json_path_check(spec.input, path=f"children[{index}].input")
    for index, (event_type, payload) in enumerate(events):
        json_path_check(payload, path=f"events[{index}]({event_type})")


class _InputCache:
    """Task inputs by task id, decoded, least recently used first out, bounded by the
    memory the decoded values take (``_deep_size``; at most ``AGENTS_INPUT_CACHE_BYTES``
    per process): an input never changes after creation, and re-reading and decoding a
    large one on every step is a large part of the step's cost. Bounded by the JSON
    text's length instead, the cache held many times its limit (a list of 30,000
    numbers: 240 KB of text, 1.1 MB of objects), gigabytes per worker."""

    def __init__(self) -> None:
        self._items: OrderedDict[UUID, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        # The model gateway runs steps on several threads (``llm.gateway``).
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def get(self, task_id: UUID) -> Any:
        """A copy of the task's input of the caller's own (it may change it)."""
        with self._lock:
            cached = self._items.get(task_id)
            if cached is not None:
                self._items.move_to_end(task_id)
        if cached is not None:
            return copy.deepcopy(cached[0])
        raw = (
            AgentTask.objects.annotate(raw=Cast("input", TextField()))
            .values_list("raw", flat=True)
            .get(pk=task_id)
        )
        value = json.loads(raw) if isinstance(raw, str) else raw
        limit = settings.AGENTS["INPUT_CACHE_BYTES"]
        # Decoded JSON is never smaller than its text: a text over the share is not sized.
        if isinstance(raw, str) and len(raw) <= limit // 4:
            size = _deep_size(value)
            if size <= limit // 4:
                with self._lock:
                    if task_id not in self._items:
                        self._items[task_id] = (value, size)
                        self._bytes += size
                    while self._bytes > limit:
                        _, (_, dropped) = self._items.popitem(last=False)
                        self._bytes -= dropped
                return copy.deepcopy(value)
        return value

    @property
    def size(self) -> int:
        """Bytes the cached values take (as ``_deep_size`` counts them)."""
        return self._bytes


def _deep_size(value: Any) -> int:
    """Bytes a decoded JSON value takes: ``sys.getsizeof`` of it and of every container,
    key and item inside (an object reached twice is counted once)."""
    seen: set[int] = set()
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


_inputs = _InputCache()


def _task_input(task_id: UUID) -> Any:
    """The task's input; each step gets its own copy, so an agent that modifies it
    affects nothing else."""
    return _inputs.get(task_id)


def _migrate(agent: Agent, checkpoint: Checkpoint, events: list[tuple[str, dict[str, Any]]]):
    state = checkpoint.state
    version = checkpoint.schema_version
    while version < agent.state_version:
        state = agent.migrations[version](state)
        events.append(
            (
                EventType.STATE_MIGRATED,
                {"from_version": version, "to_version": version + 1, "checkpoint": checkpoint.step},
            )
        )
        version += 1
    return state


def _resumption(task_id: UUID, step: int, checkpoint: Checkpoint) -> Resumption | None:
    if "suspended" not in checkpoint.observations:
        return None
    return suspensions.resumption_for(task_id=task_id, step=step)
