"""What happens to a step that did not succeed: retry later, fail, refuse, or dead-letter.

- A retryable failure schedules the same step again after an exponential backoff with
  jitter, kept as the task's ``retry_at`` that the scheduler fires (no broker-side ETA),
  until the agent's ``max_retries`` (or a tool's, if lower) is spent.
- The attempt after the last retry dead-letters the task: status ``dead_lettered``, a
  ``DeadLetter`` row with the reason, traceback, attempt count and original message,
  and the message itself rejected into RabbitMQ's dead-letter queue.
- A step whose process keeps dying under it (a delivery takes over its expired lease)
  is dead-lettered after ``AGENTS_MAX_WORKER_LOSSES`` such take-overs. Only a process
  death or a hard time limit lets a lease expire; a broker reconnect or a graceful
  shutdown does not count.
- A permanent error ends the task ``failed``; a step this worker cannot run is refused
  and parked (``needs_state_version``) without touching the task's progress.

Every write here is fenced: it happens only if the caller still holds the step's lease
(``fence``), and it ends the lease. Every attempt is audited (``step_failed``,
``worker_lost``, ``dead_lettered``); error texts are made storable first (no NUL, no
unpaired surrogate), so recording a failure cannot fail in its turn.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import transaction

from agents.core import clock
from agents.core.leases import RELEASE_FIELDS, lease_release_values
from agents.core.results import StepResult
from agents.core.state_machine import RUNNABLE, TRANSITION_FIELDS, transition
from agents.definition import Agent
from agents.errors import RetryableError
from agents.models import AgentTask, TaskStatus
from agents_project.validation import json_storable
from audit.models import AuditEvent, DeadLetter, EventType
from audit.services import AuditBatch

logger = structlog.get_logger(__name__)

Events = list[tuple[str, dict[str, Any]]]


def safe_text(text: Any) -> str:
    """``text`` as a string PostgreSQL stores: NUL characters and unpaired surrogates
    replaced by U+FFFD."""
    return json_storable(str(text))


def _storable(events: Events) -> Events:
    """The step's events, made storable: a failure is recorded even when what the step
    produced is what the database refused."""
    return [(kind, json_storable(payload)) for kind, payload in events]


def backoff_delay(attempt: int) -> float:
    """Seconds before retry number ``attempt``: exponential, capped, with equal jitter."""
    conf = settings.AGENTS
    ceiling = min(conf["RETRY_BACKOFF_MAX"], conf["RETRY_BACKOFF"] * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_budget(agent: Agent, error: BaseException) -> int:
    budget = agent.max_retries if agent.max_retries is not None else settings.AGENTS["MAX_RETRIES"]
    tool_budget = getattr(error, "max_retries", None) if isinstance(error, RetryableError) else None
    return min(budget, tool_budget) if tool_budget is not None else budget


def task_lock_if_current(
    *, task_id: UUID, step: int, fence: int, statuses: Iterable[str] | None = RUNNABLE
) -> AgentTask | None:
    """Lock the task; None if the caller's lease (``fence``) on ``step`` was lost, or
    (unless ``statuses`` is None) the task's status is not one of ``statuses``."""
    task = AgentTask.objects.select_for_update().defer("input", "result").get(pk=task_id)
    if task.current_step != step or task.fence != fence:
        return None
    if statuses is not None and task.status not in statuses:
        return None
    return task


def _end_delivery(task: AgentTask) -> None:
    """This delivery's message is about to be acknowledged: it can no longer arrive,
    and its lease ends."""
    task.in_flight = max(task.in_flight - 1, 0)
    for name, value in lease_release_values().items():
        setattr(task, name, value)


def schedule_retry(
    *,
    task_id: UUID,
    step: int,
    fence: int,
    error: BaseException,
    delay: float,
    events: Events,
    actor: str,
) -> StepResult:
    """Run ``step`` again after ``delay`` seconds without spending an attempt."""
    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step, fence=fence)
        if task is None:
            return StepResult.STALE
        _retry_later(task, step=step, error=error, delay=delay, events=events, actor=actor)
    return StepResult.RETRY


def retry_or_dead_letter(
    *,
    task_id: UUID,
    step: int,
    fence: int,
    agent: Agent,
    error: BaseException,
    events: Events,
    message: Mapping[str, Any],
    actor: str,
) -> StepResult:
    """A retryable failure: schedule the next attempt, or dead-letter after the last."""
    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step, fence=fence)
        if task is None:
            return StepResult.STALE
        task.attempt += 1
        if task.attempt <= retry_budget(agent, error):
            _retry_later(
                task,
                step=step,
                error=error,
                delay=backoff_delay(task.attempt),
                events=events,
                actor=actor,
            )
            return StepResult.RETRY
        audit = AuditBatch(task, actor=actor)
        audit.add_all(_storable(events), step=step)
        dead_letter_record(
            task,
            audit,
            step=step,
            reason=DeadLetter.Reason.RETRIES_EXHAUSTED,
            error=f"{type(error).__name__}: {safe_text(error)}",
            tb=safe_text("".join(traceback.format_exception(error))),
            message=message,
        )
        audit.flush()
        task.save(
            update_fields=("attempt", "audit_seq", "error", *RELEASE_FIELDS, *TRANSITION_FIELDS)
        )
    return StepResult.DEAD_LETTERED


def _retry_later(
    task: AgentTask, *, step: int, error: BaseException, delay: float, events: Events, actor: str
) -> None:
    audit = AuditBatch(task, actor=actor)
    audit.add_all(_storable(events), step=step)
    audit.add(
        EventType.STEP_FAILED,
        {
            "error": safe_text(error),
            "error_type": type(error).__name__,
            "attempt": task.attempt,
            "retry_in_seconds": round(delay, 3),
        },
        step=step,
    )
    now = clock.now()
    task.retry_at = now + timedelta(seconds=delay)
    task.updated_at = now
    _end_delivery(task)
    audit.flush()
    task.save(update_fields=("attempt", "retry_at", "audit_seq", "updated_at", *RELEASE_FIELDS))


def step_fail(
    *, task_id: UUID, step: int, fence: int, error: BaseException, events: Events, actor: str
) -> StepResult:
    """A permanent error: the task ends ``failed``; what the step did is still recorded."""
    logger.warning("step failed permanently", error=safe_text(error))
    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step, fence=fence)
        if task is None:
            return StepResult.STALE
        audit = AuditBatch(task, actor=actor)
        audit.add_all(_storable(events), step=step)
        audit.add(
            EventType.STEP_FAILED,
            {
                "error": safe_text(error),
                "error_type": type(error).__name__,
                "permanent": True,
                "attempt": task.attempt + 1,
                "traceback": safe_text("".join(traceback.format_exception(error))),
            },
            step=step,
        )
        task.error = safe_text(error)
        _end_delivery(task)
        transition(task, TaskStatus.FAILED, audit=audit, reason=task.error)
        audit.flush()
        task.save(update_fields=("error", "audit_seq", *RELEASE_FIELDS, *TRANSITION_FIELDS))
    return StepResult.FAILED


def step_refuse(
    *,
    task_id: UUID,
    step: int,
    fence: int,
    needs_state_version: int,
    reason: str,
    actor: str,
) -> None:
    """Leave the task's progress exactly as it is, park the step until a worker with an
    agent of at least ``needs_state_version`` sweeps it (0: any worker that knows the
    agent), and say why in the audit trail and the log: once per step and reason."""
    logger.error("step refused", reason=reason)
    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step, fence=fence)
        if task is None:
            return
        task.needs_state_version = needs_state_version
        _end_delivery(task)
        fields = ["needs_state_version", *RELEASE_FIELDS]
        said = AuditEvent.objects.filter(
            task_id=task_id, step=step, type=EventType.SCHEMA_REFUSED, payload__reason=reason
        ).exists()
        if not said:
            audit = AuditBatch(task, actor=actor)
            audit.add(EventType.SCHEMA_REFUSED, {"reason": reason}, step=step)
            audit.flush()
            fields.append("audit_seq")
        task.save(update_fields=fields)


def worker_loss_record(
    *, task_id: UUID, step: int, fence: int, message: Mapping[str, Any], actor: str
) -> bool:
    """Record that this delivery took over the expired lease of a process that died (or
    was killed at its hard time limit) under ``step``; True if that dead-lettered the
    task (``AGENTS_MAX_WORKER_LOSSES`` reached)."""
    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step, fence=fence)
        if task is None:
            return False
        audit = AuditBatch(task, actor=actor)
        audit.add(EventType.WORKER_LOST, {"losses": task.worker_losses}, step=step)
        limit = settings.AGENTS["MAX_WORKER_LOSSES"]
        dead = task.worker_losses >= limit
        fields = ["audit_seq"]
        if dead:
            dead_letter_record(
                task,
                audit,
                step=step,
                reason=DeadLetter.Reason.WORKER_LOST,
                error=f"the process running step {step} died {task.worker_losses} times",
                tb="",
                message=message,
            )
            fields += ["error", *RELEASE_FIELDS, *TRANSITION_FIELDS]
        audit.flush()
        task.save(update_fields=fields)
    if dead:
        logger.error("step dead-lettered: it keeps killing workers", losses=task.worker_losses)
    return dead


def dead_letter_record(
    task: AgentTask,
    audit: AuditBatch,
    *,
    step: int,
    reason: str,
    error: str,
    tb: str,
    message: Mapping[str, Any],
) -> None:
    """Record the dead letter and end the task ``dead_lettered`` (its message is about
    to be rejected into the DLQ, so it can no longer arrive)."""
    attempts = max(task.attempt, task.worker_losses)
    letter = DeadLetter.objects.create(
        task=task,
        step=step,
        reason=reason,
        error=error,
        traceback=tb,
        attempts=attempts,
        message=dict(message),
    )
    audit.add(
        EventType.DEAD_LETTERED,
        {"dead_letter": letter.pk, "reason": reason, "error": error, "attempts": attempts},
        step=step,
    )
    task.error = error
    task.in_flight = 0
    for name, value in lease_release_values().items():
        setattr(task, name, value)
    transition(task, TaskStatus.DEAD_LETTERED, audit=audit, reason=reason)
