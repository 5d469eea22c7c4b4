"""Dead letters: the ``DeadLetter`` table is the record; RabbitMQ's DLQ is its inbox.

A step is dead-lettered in two ways:

- by the engine (retries spent, or its process died ``AGENTS_MAX_WORKER_LOSSES``
  times): it writes the ``DeadLetter`` row and ends the task in one transaction, then
  rejects the message into the DLQ;
- by RabbitMQ on its own, when a message reaches the work queue's ``x-delivery-limit``
  before the engine counted it (for instance while the database was away). No row
  exists for it yet.

``dead_letter_queue_reconcile`` (run by the scheduler every
``AGENTS_DLQ_RECONCILE_INTERVAL`` seconds) drains the DLQ: a message whose step
already has a row is acknowledged (recorded), a message RabbitMQ dead-lettered for a
task still running at that step becomes a row and ends the task ``dead_lettered``, a
message for a step that has moved on is dropped. So every dead letter is one row an
operator can list, inspect and requeue, and requeueing never scans the DLQ.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agents.core.dispatch import current_step_publish
from agents.core.leases import RELEASE_FIELDS
from agents.core.retries import dead_letter_record
from agents.core.state_machine import RUNNABLE, TRANSITION_FIELDS, transition
from agents.definition import registered_agents
from agents.models import AgentTask, TaskStatus
from agents_project.celery import app
from agents_project.errors import Conflict, NotFound
from agents_project.topology import dead_letter_queue
from audit.models import DeadLetter, EventType
from audit.services import AuditBatch

logger = structlog.get_logger(__name__)

RECONCILE_BATCH = 200


def dead_letter_requeue(*, dead_letter_id: int, actor: str) -> AgentTask:
    """Send a dead-lettered task back to work from its last checkpoint.

    Safe to call twice: the second call finds the letter already requeued (``Conflict``,
    409). ``Backpressure`` if the broker refuses the step: then nothing changed.
    """
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().filter(pk=dead_letter_id).first()
        if letter is None:
            raise NotFound(f"no dead letter {dead_letter_id}")
        task = AgentTask.objects.select_for_update().get(pk=letter.task_id)
        if letter.requeued_at is not None or task.status != TaskStatus.DEAD_LETTERED:
            raise Conflict(f"dead letter {dead_letter_id} was already requeued or resolved")
        if task.agent_name not in registered_agents():
            raise Conflict(f"agent {task.agent_name!r} is not registered here")
        letter.requeued_at = timezone.now()
        letter.requeued_by = actor
        letter.save(update_fields=("requeued_at", "requeued_by"))
        task.attempt = 0
        task.worker_losses = 0
        task.retry_at = None
        task.error = ""
        audit = AuditBatch(task, actor=actor)
        audit.add(EventType.REQUEUED, {"dead_letter": letter.pk}, step=task.current_step)
        transition(task, TaskStatus.RUNNING, audit=audit, reason="requeued")
        current_step_publish(task=task)
        audit.flush()
        task.save(
            update_fields=(
                "attempt",
                "worker_losses",
                "retry_at",
                "error",
                "audit_seq",
                "in_flight",
                *TRANSITION_FIELDS,
            )
        )
    return task


def dead_letter_queue_reconcile(*, actor: str, limit: int = RECONCILE_BATCH) -> int:
    """Drain up to ``limit`` messages from the DLQ into ``DeadLetter`` rows; returns how
    many new rows it wrote. A message is acknowledged only after its row committed."""
    if not settings.BROKER_IS_AMQP:
        return 0
    recorded = 0
    with app.connection_for_write() as conn:
        queue = dead_letter_queue(settings.AGENTS)(conn.default_channel)
        for _ in range(limit):
            message = queue.get(no_ack=False)
            if message is None:
                break
            try:
                recorded += _reconcile_one(message, actor=actor)
            except Exception:
                message.requeue()
                raise
            message.ack()
    if recorded:
        logger.warning("dead letters recorded from the dead-letter queue", count=recorded)
    return recorded


def _reconcile_one(message: Any, *, actor: str) -> int:
    body = message.payload
    args = body[0] if isinstance(body, list | tuple) and body else []
    try:
        task_id, step = UUID(str(args[0])), int(args[1])
    except (IndexError, TypeError, ValueError):
        logger.error("unreadable message in the dead-letter queue dropped", body=repr(body))
        return 0
    if DeadLetter.objects.filter(task_id=task_id, step=step).exists():
        return 0
    with transaction.atomic():
        task = AgentTask.objects.select_for_update().filter(pk=task_id).first()
        if task is None or task.current_step != step or task.status not in RUNNABLE:
            return 0
        deaths = message.headers.get("x-death") or [{}]
        reason = str(deaths[0].get("reason", "delivery_limit"))
        audit = AuditBatch(task, actor=actor)
        dead_letter_record(
            task,
            audit,
            step=step,
            reason=DeadLetter.Reason.DELIVERY_LIMIT,
            error=f"RabbitMQ dead-lettered the step's message ({reason})",
            tb="",
            message={"args": [str(task_id), step], "headers": _plain(message.headers)},
        )
        audit.flush()
        task.save(update_fields=("audit_seq", "error", *RELEASE_FIELDS, *TRANSITION_FIELDS))
    return 1


def _plain(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if isinstance(v, str | int | bool)}
