"""What happens to a step that did not succeed: retry later, or dead-letter.

- A retryable failure schedules the same step again after an exponential backoff with
  jitter, kept as the task's ``retry_at`` that the scheduler fires (no broker-side ETA),
  until the agent's ``max_retries`` (or a tool's, if lower) is spent.
- The attempt after the last retry dead-letters the task: status ``dead_lettered``, a
  ``DeadLetter`` row with the reason, traceback, attempt count and original message,
  and the message itself rejected into RabbitMQ's dead-letter queue.
- A step whose worker keeps dying under it (the message comes back redelivered) is
  dead-lettered after ``MAX_WORKER_LOSSES`` such deliveries, before RabbitMQ's own
  delivery limit would drop it into the dead-letter queue unrecorded.

Every attempt is audited (``step_failed``, ``worker_lost``, ``dead_lettered``).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agents.dead_letter_queue import dead_letter_queue_remove
from agents.definition import Agent, registered_agents
from agents.dispatch import step_publish_after_commit
from agents.errors import RetryableError
from agents.models import AgentTask, TaskStatus
from agents.state_machine import TRANSITION_FIELDS, transition
from agents_project.errors import Conflict, NotFound
from audit.models import DeadLetter, EventType
from audit.services import AuditBatch

if TYPE_CHECKING:
    from agents.engine import StepResult

logger = structlog.get_logger(__name__)

Events = list[tuple[str, dict[str, Any]]]


def backoff_delay(attempt: int) -> float:
    """Seconds before retry number ``attempt``: exponential, capped, with equal jitter."""
    conf = settings.AGENTS
    ceiling = min(conf["RETRY_BACKOFF_MAX"], conf["RETRY_BACKOFF"] * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_budget(agent: Agent, error: BaseException) -> int:
    budget = agent.max_retries if agent.max_retries is not None else settings.AGENTS["MAX_RETRIES"]
    tool_budget = getattr(error, "max_retries", None) if isinstance(error, RetryableError) else None
    return min(budget, tool_budget) if tool_budget is not None else budget


def schedule_retry(
    *,
    task_id: UUID,
    step: int,
    error: BaseException,
    delay: float,
    events: Events,
    actor: str,
) -> StepResult:
    """Run ``step`` again after ``delay`` seconds without spending an attempt."""
    from agents.engine import StepResult

    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step)
        if task is None:
            return StepResult.STALE
        _retry_later(task, step=step, error=error, delay=delay, events=events, actor=actor)
    return StepResult.RETRY


def retry_or_dead_letter(
    *,
    task_id: UUID,
    step: int,
    agent: Agent,
    error: BaseException,
    events: Events,
    message: Mapping[str, Any],
    actor: str,
) -> StepResult:
    """A retryable failure: schedule the next attempt, or dead-letter after the last."""
    from agents.engine import StepResult

    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=step)
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
        audit.add_all(events, step=step)
        _dead_letter(
            task,
            audit,
            step=step,
            reason=DeadLetter.Reason.RETRIES_EXHAUSTED,
            error=f"{type(error).__name__}: {error}",
            tb="".join(traceback.format_exception(error)),
            message=message,
        )
        audit.flush()
        task.save(update_fields=("attempt", "audit_seq", *TRANSITION_FIELDS))
    return StepResult.DEAD_LETTERED


def task_lock_if_current(*, task_id: UUID, step: int) -> AgentTask | None:
    """Lock the task; None if ``step`` is no longer its current, running step."""
    task = AgentTask.objects.select_for_update().get(pk=task_id)
    if task.current_step != step or task.status != TaskStatus.RUNNING:
        return None
    return task


def _retry_later(
    task: AgentTask, *, step: int, error: BaseException, delay: float, events: Events, actor: str
) -> None:
    audit = AuditBatch(task, actor=actor)
    audit.add_all(events, step=step)
    audit.add(
        EventType.STEP_FAILED,
        {
            "error": str(error),
            "error_type": type(error).__name__,
            "attempt": task.attempt,
            "retry_in_seconds": round(delay, 3),
        },
        step=step,
    )
    now = timezone.now()
    task.retry_at = now + timedelta(seconds=delay)
    task.updated_at = now
    audit.flush()
    task.save(update_fields=("attempt", "retry_at", "audit_seq", "updated_at"))


def worker_loss_record(*, task_id: UUID, step: int, message: Mapping[str, Any], actor: str) -> bool:
    """Count a redelivery of ``step`` (its worker died); True if that dead-lettered the task."""
    with transaction.atomic():
        task = AgentTask.objects.select_for_update().get(pk=task_id)
        if task.current_step != step or task.status not in (TaskStatus.PENDING, TaskStatus.RUNNING):
            return False
        task.worker_losses += 1
        audit = AuditBatch(task, actor=actor)
        audit.add(EventType.WORKER_LOST, {"losses": task.worker_losses}, step=step)
        limit = settings.AGENTS["MAX_WORKER_LOSSES"]
        dead = task.worker_losses >= limit
        if dead:
            _dead_letter(
                task,
                audit,
                step=step,
                reason=DeadLetter.Reason.WORKER_LOST,
                error=f"the worker running step {step} died {task.worker_losses} times",
                tb="",
                message=message,
            )
        audit.flush()
        task.save(update_fields=("worker_losses", "audit_seq", "updated_at", *TRANSITION_FIELDS))
    if dead:
        logger.error("step dead-lettered: it keeps killing workers", losses=task.worker_losses)
    return dead


def _dead_letter(
    task: AgentTask,
    audit: AuditBatch,
    *,
    step: int,
    reason: str,
    error: str,
    tb: str,
    message: Mapping[str, Any],
) -> None:
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
    transition(task, TaskStatus.DEAD_LETTERED, audit=audit, reason=reason)


def dead_letter_requeue(*, dead_letter_id: int, actor: str) -> AgentTask:
    """Send a dead-lettered task back to work from its last checkpoint.

    Safe to call twice: the second call finds the letter already requeued (409).
    """
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().filter(pk=dead_letter_id).first()
        if letter is None:
            raise NotFound(f"no dead letter {dead_letter_id}")
        task = AgentTask.objects.select_for_update().get(pk=letter.task_id)
        if letter.requeued_at is not None or task.status != TaskStatus.DEAD_LETTERED:
            raise Conflict(f"dead letter {dead_letter_id} was already requeued or resolved")
        agent = registered_agents().get(task.agent_name)
        if agent is None:
            raise Conflict(f"agent {task.agent_name!r} is not registered here")
        letter.requeued_at = timezone.now()
        letter.requeued_by = actor
        letter.save(update_fields=("requeued_at", "requeued_by"))
        task.attempt = 0
        task.worker_losses = 0
        task.retry_at = None
        audit = AuditBatch(task, actor=actor)
        audit.add(EventType.REQUEUED, {"dead_letter": letter.pk}, step=task.current_step)
        transition(task, TaskStatus.RUNNING, audit=audit, reason="requeued")
        audit.flush()
        task.save(
            update_fields=("attempt", "worker_losses", "retry_at", "audit_seq", *TRANSITION_FIELDS)
        )
        step_publish_after_commit(
            task_id=task.pk, step=task.current_step, agent=agent, deadline=task.deadline
        )
        transaction.on_commit(lambda: dead_letter_queue_remove(task_id=task.pk))
    return task
