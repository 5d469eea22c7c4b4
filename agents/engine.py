"""The step engine: run one step of one task, durably.

A delivery of ``(task id, step)`` goes through:

1. a plain read of the task: a delivery for a step that is not the task's current one,
   or for a task that cannot run, is a duplicate or stale and is dropped;
2. the task's deadline, and (for a redelivered message) how many workers died under
   this step: either may end the task here;
3. the checkpoint of the previous step, migrated if older code wrote it, refused if
   newer code did;
4. the agent's ``step``, then the tools it asked for, each with the idempotency key
   ``task id : step : call index``; no database transaction is open meanwhile, so a
   slow model or tool holds no lock;
5. one transaction: lock the task row, check the step is still current, insert the
   checkpoint and every audit event, advance the task (and its status, through the
   state machine);
6. after that commits, publish the next step.

Steps are at-least-once underneath: if two deliveries of the same step both run, the
row lock and the step check let only the first commit, and the tools' idempotency keys
make their side effects happen once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict
from enum import StrEnum
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, transaction
from django.utils import timezone

from agents import scheduling
from agents.definition import (
    Agent,
    CallTools,
    Continue,
    Fail,
    Finish,
    Outcome,
    Resumption,
    StepContext,
    Suspend,
    ToolResult,
    registered_agents,
)
from agents.dispatch import step_publish_or_sweep
from agents.errors import PermanentError, RetryLater
from agents.faults import fault_point
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.retries import (
    retry_or_dead_letter,
    schedule_retry,
    task_lock_if_current,
    worker_loss_record,
)
from agents.state_machine import RUNNABLE, TRANSITION_FIELDS, transition
from agents_project import metrics
from audit.models import EventType
from audit.services import AuditBatch, process_actor
from tools.runner import ToolRun, tools_run

logger = structlog.get_logger(__name__)


def _actor() -> str:
    # Per call, not at import: pool processes are forked after this module is imported.
    return process_actor("worker")


DATABASE_ERRORS = (OperationalError, InterfaceError)


class StepResult(StrEnum):
    COMMITTED = "committed"
    STALE = "stale"
    RETRY = "retry_scheduled"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    REFUSED = "refused"
    TIMED_OUT = "timed_out"


# Fields the commit of a step changes on the task row (plus result, error and status
# when the outcome ends or suspends the task).
_ADVANCE_FIELDS = (
    "current_step",
    "attempt",
    "retry_at",
    "worker_losses",
    "state_version",
    "audit_seq",
    "updated_at",
)
# The hot path never reads these (possibly large) fields under the row lock.
_LARGE_FIELDS = ("input", "result")

_OUTCOME_NAMES = {
    Continue: "continue",
    CallTools: "call_tools",
    Suspend: "suspend",
    Finish: "finish",
    Fail: "fail",
}


def step_execute(
    *,
    task_id: UUID,
    step: int,
    redelivered: bool = False,
    message: Mapping[str, Any] | None = None,
) -> StepResult:
    """Run ``step`` of the task once. Safe to call any number of times per step.

    Retries are scheduled in the database (``agents.retries``), not by raising; a
    ``DEAD_LETTERED`` result tells the Celery task to reject its message so RabbitMQ
    moves it to the dead-letter queue.
    """
    with structlog.contextvars.bound_contextvars(task_id=str(task_id), step=step):
        waited, delay = 0.0, 0.5
        retrying = False
        while True:
            try:
                return _execute(task_id, step, redelivered, retrying, dict(message or {}))
            except DATABASE_ERRORS as exc:
                # The database is restarting or unreachable. Nothing can progress without
                # it, so this step holds its message and waits, rather than failing a
                # task over an outage. Re-running the step is safe (it is idempotent).
                if waited >= settings.AGENTS["DATABASE_PATIENCE"]:
                    raise
                logger.warning("database unavailable; the step waits", error=repr(exc))
                with contextlib.suppress(*DATABASE_ERRORS):
                    connections.close_all()
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)
                retrying = True


def _execute(
    task_id: UUID, step: int, redelivered: bool, retrying: bool, message: dict[str, Any]
) -> StepResult:
    task = _load(task_id)
    if task is None:
        logger.warning("step for unknown task dropped")
        return StepResult.STALE
    if task.current_step != step or task.status not in RUNNABLE:
        if (redelivered or retrying) and task.current_step == step + 1 and task.status in RUNNABLE:
            # This step committed, then its worker (or its connection) died before the
            # message was acknowledged: the next step may never have been published.
            # Publishing it again is safe, a duplicate is dropped; waiting for the
            # stuck-task sweep would only be slower.
            agent = registered_agents().get(task.agent_name)
            if agent is not None:
                step_publish_or_sweep(
                    task_id=task_id, step=step + 1, agent=agent, deadline=task.deadline
                )
        logger.info("stale delivery dropped", status=task.status, current_step=task.current_step)
        return StepResult.STALE
    if task.retry_at is not None and task.retry_at > timezone.now():
        # A duplicate delivery while the step waits out its backoff: the scheduler will
        # publish it when the backoff has passed.
        logger.info("early delivery dropped; a retry is pending", retry_at=str(task.retry_at))
        return StepResult.STALE
    if task.deadline is not None and task.deadline <= timezone.now():
        scheduling.task_time_out(task_id=task_id, actor=_actor())
        return StepResult.TIMED_OUT
    if redelivered and worker_loss_record(
        task_id=task_id, step=step, message=message, actor=_actor()
    ):
        return StepResult.DEAD_LETTERED
    agent = registered_agents().get(task.agent_name)
    if agent is None:
        _refuse(task_id, step, f"agent {task.agent_name!r} is not registered in this worker")
        return StepResult.REFUSED
    checkpoint = Checkpoint.objects.get(task_id=task_id, step=step - 1)
    if checkpoint.schema_version > agent.state_version:
        _refuse(
            task_id,
            step,
            f"checkpoint {step - 1} has state schema version {checkpoint.schema_version}; "
            f"this worker's {agent.name} knows up to {agent.state_version}. The task is "
            "left untouched until a worker with newer code takes it.",
        )
        return StepResult.REFUSED
    if task.status == TaskStatus.PENDING and not scheduling.task_begin(
        task_id=task_id, actor=_actor()
    ):
        return StepResult.STALE

    events: list[tuple[str, dict[str, Any]]] = []
    state = _migrate(agent, checkpoint, events)
    ctx = StepContext(
        task_id=task_id,
        step=step,
        attempt=task.attempt + 1,
        input=_task_input(task_id),
        state=state,
        tool_results=tuple(
            ToolResult(**r) for r in checkpoint.observations.get("tool_results", ())
        ),
        resumed=_resumption(task_id, step - 1, checkpoint),
        events=events,
    )
    started = time.monotonic()
    tool_run = ToolRun(task_id=task_id, owner_id=task.owner_id, step=step, events=events)
    try:
        outcome = agent.step(ctx)
        if not isinstance(outcome, Continue | CallTools | Suspend | Finish | Fail):
            raise PermanentError(f"{agent.name}.step returned {outcome!r}, not an outcome")
        if outcome.reasoning:
            events.append((EventType.REASONING, {"text": outcome.reasoning}))
        results = tools_run(tool_run, outcome.calls) if isinstance(outcome, CallTools) else []
    except RetryLater as exc:
        return schedule_retry(
            task_id=task_id, step=step, error=exc, delay=exc.delay, events=events, actor=_actor()
        )
    except PermanentError as exc:
        metrics.step_failed(agent=agent.name, events=events)
        return _fail(task_id, step, exc, events)
    except Exception as exc:
        logger.warning("step attempt failed", error=repr(exc), attempt=ctx.attempt)
        metrics.step_failed(agent=agent.name, events=events)
        return retry_or_dead_letter(
            task_id=task_id,
            step=step,
            agent=agent,
            error=exc,
            events=events,
            message=message,
            actor=_actor(),
        )
    duration_ms = round((time.monotonic() - started) * 1000, 3)
    return _commit(task_id, step, agent, state, outcome, results, events, duration_ms)


def _load(task_id: UUID) -> AgentTask | None:
    # Task creation publishes step 1 just before its transaction commits (so a refused
    # publish creates nothing); a fast worker can get there first. Wait briefly.
    tasks = AgentTask.objects.filter(pk=task_id).defer(*_LARGE_FIELDS)
    task = tasks.first()
    for delay in (0.05, 0.1, 0.25, 0.5, 1.0):
        if task is not None:
            break
        time.sleep(delay)
        task = tasks.first()
    return task


@functools.lru_cache(maxsize=256)
def _cached_input(task_id: UUID) -> Any:
    return AgentTask.objects.values_list("input", flat=True).get(pk=task_id)


def _task_input(task_id: UUID) -> Any:
    """The task's input, read once per worker process: it never changes after creation,
    and re-reading a large input on every step was a third of the step's cost. Each
    step gets its own copy, so an agent that modifies it affects nothing else."""
    return copy.deepcopy(_cached_input(task_id))


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
    return scheduling.resumption_for(task_id=task_id, step=step)


def _commit(
    task_id: UUID,
    step: int,
    agent: Agent,
    state: Any,
    outcome: Outcome,
    results: list[ToolResult],
    events: list[tuple[str, dict[str, Any]]],
    duration_ms: float,
) -> StepResult:
    kind = _OUTCOME_NAMES[type(outcome)]
    new_state = state if outcome.state is None else outcome.state
    observations: dict[str, Any] = {}
    if results:
        observations["tool_results"] = [asdict(r) for r in results]
    if isinstance(outcome, Suspend):
        observations["suspended"] = True
    publish_next = False
    with transaction.atomic():
        task = AgentTask.objects.select_for_update().defer(*_LARGE_FIELDS).get(pk=task_id)
        if task.current_step != step:
            logger.info("step already committed by another delivery; result dropped")
            return StepResult.STALE
        audit = AuditBatch(task, actor=_actor())
        audit.add_all(events, step=step)
        audit.add(EventType.STEP, {"outcome": kind, "duration_ms": duration_ms}, step=step)
        Checkpoint.objects.create(
            task=task,
            step=step,
            state=new_state,
            observations=observations,
            schema_version=agent.state_version,
        )
        proceed = task.status == TaskStatus.RUNNING
        fields = list(_ADVANCE_FIELDS)
        if not proceed:
            # Cancelled or timed out while the step ran: keep its work, start nothing new.
            logger.info("step recorded after the task stopped", status=task.status)
        elif isinstance(outcome, Continue | CallTools):
            publish_next = True
        elif isinstance(outcome, Finish):
            task.result = outcome.result
            transition(task, TaskStatus.COMPLETED, audit=audit)
            fields += ["result", *TRANSITION_FIELDS]
        elif isinstance(outcome, Fail):
            task.error = outcome.error
            transition(task, TaskStatus.FAILED, audit=audit, reason=outcome.error)
            fields += ["error", *TRANSITION_FIELDS]
        elif isinstance(outcome, Suspend):
            publish_next = scheduling.suspension_open(
                task=task, step=step, outcome=outcome, audit=audit
            )
            fields += TRANSITION_FIELDS
        task.current_step = step + 1
        task.attempt = 0
        task.retry_at = None
        task.worker_losses = 0
        task.state_version = agent.state_version
        task.updated_at = timezone.now()
        audit.flush()
        task.save(update_fields=fields)
        fault_point("before_commit", step=step)
    fault_point("after_commit", step=step)
    metrics.step_committed(agent=agent.name, duration_ms=duration_ms)
    if publish_next:
        step_publish_or_sweep(task_id=task_id, step=step + 1, agent=agent, deadline=task.deadline)
    fault_point("after_publish", step=step)
    return StepResult.COMMITTED


def _fail(
    task_id: UUID, step: int, error: PermanentError, events: list[tuple[str, dict[str, Any]]]
) -> StepResult:
    """A permanent error: the task ends ``failed``; what the step did is still recorded."""
    logger.warning("step failed permanently", error=str(error))
    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step)
        if task is None:
            return StepResult.STALE
        audit = AuditBatch(task, actor=_actor())
        audit.add_all(events, step=step)
        audit.add(
            EventType.STEP_FAILED,
            {
                "error": str(error),
                "error_type": type(error).__name__,
                "permanent": True,
                "attempt": task.attempt + 1,
                "traceback": "".join(traceback.format_exception(error)),
            },
            step=step,
        )
        task.error = str(error)
        transition(task, TaskStatus.FAILED, audit=audit, reason=str(error))
        audit.flush()
        task.save(update_fields=("error", "audit_seq", *TRANSITION_FIELDS))
    return StepResult.FAILED


def _refuse(task_id: UUID, step: int, reason: str) -> None:
    """Leave the task exactly as it is, and say why in the audit trail and the log.

    Written once per step and reason: the stuck-task sweep will offer the step again
    later, and a repeat of the same refusal adds nothing to the trail.
    """
    logger.error("step refused", reason=reason)
    with transaction.atomic():
        task = AgentTask.objects.select_for_update().get(pk=task_id)
        last = task.audit_events.order_by("-seq").first()
        if last and last.type == EventType.SCHEMA_REFUSED and last.payload.get("reason") == reason:
            return
        audit = AuditBatch(task, actor=_actor())
        audit.add(EventType.SCHEMA_REFUSED, {"reason": reason}, step=step)
        audit.flush()
        task.save(update_fields=("audit_seq",))
