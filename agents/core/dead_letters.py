"""Dead letters: the ``DeadLetter`` table is the record; RabbitMQ's DLQ is its inbox.

A step is dead-lettered in two ways:

- by the engine (retries spent, or its process died ``AGENTS_MAX_WORKER_LOSSES``
  times): it writes the ``DeadLetter`` row and ends the task in one transaction, then
  rejects the message into the DLQ;
- by RabbitMQ on its own, when a message reaches the work queue's ``x-delivery-limit``
  before the engine counted it (for instance while the database was away). No row
  exists for it yet.

``dead_letter_queue_reconcile`` (run by the scheduler every
``AGENTS_DLQ_RECONCILE_INTERVAL`` seconds, and after every requeue) keeps the DLQ
holding exactly one message per open letter: a message RabbitMQ dead-lettered for a
task still running at that step becomes a row and ends the task ``dead_lettered``; the
message of a requeued letter, of a step that has moved on, or a duplicate, is removed.
So every dead letter is one row an operator can list, inspect and requeue, the DLQ's
depth is the number of letters still open, and requeueing reads the row, not the DLQ.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import F, Max
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
    409). ``Backpressure`` if the broker refuses the step: then nothing changed. Once
    the requeue committed, the letter's message is taken out of the DLQ (a pass of
    ``dead_letter_queue_reconcile``; if the broker is away, the scheduler's next pass).
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
        transaction.on_commit(lambda: _drain_after_requeue(actor=actor))
    return task


def _drain_after_requeue(*, actor: str) -> None:
    try:
        dead_letter_queue_reconcile(actor=actor, force=True)
    except Exception:
        logger.exception("the DLQ could not be reconciled after a requeue; the scheduler will")


def dead_letter_queue_reconcile(
    *, actor: str, limit: int = RECONCILE_BATCH, force: bool = False
) -> int:
    """Make the DLQ hold exactly one message per open dead letter; returns how many new
    rows it wrote. One pass over up to ``limit`` messages, each held until the pass
    ends (so none is read twice), then:

    - a message of an open letter (its task still ``dead_lettered`` at that step) is
      kept, once (a duplicate is removed);
    - a message RabbitMQ dead-lettered by itself for a task still running at that step
      becomes a ``DeadLetter`` row (the task ends ``dead_lettered``) and is kept;
    - any other (its letter requeued, its step moved on, unreadable) is removed.

    A message is removed only after its row committed. Kept messages go back to the
    queue (``basic.reject`` with requeue). Skipped when the DLQ already holds as many
    messages as there are open letters, unless ``force``."""
    if not settings.BROKER_IS_AMQP:
        return 0
    recorded = 0
    with app.connection_for_write() as conn:
        queue = dead_letter_queue(settings.AGENTS)(conn.default_channel)
        _, depth, _ = queue.queue_declare(passive=True)
        if depth == 0 or (not force and depth == _open_letters()):
            return 0
        held: list[tuple[Any, bool]] = []
        kept: set[tuple[UUID, int]] = set()
        try:
            for _ in range(min(limit, depth)):
                message = queue.get(no_ack=False)
                if message is None:
                    break
                held.append((message, True))
                keep, new = _reconcile_one(message, actor=actor, kept=kept)
                held[-1] = (message, keep)
                recorded += new
        finally:
            for message, keep in held:
                if keep:
                    message.requeue()
                else:
                    message.ack()
            if held:
                # A round trip on the channel: the broker has the answers when we return.
                queue.queue_declare(passive=True)
    if recorded:
        logger.warning("dead letters recorded from the dead-letter queue", count=recorded)
    return recorded


def _open_letters() -> int:
    """Dead letters still open: not requeued, their task dead-lettered at their step."""
    return DeadLetter.objects.filter(
        requeued_at__isnull=True,
        task__status=TaskStatus.DEAD_LETTERED,
        task__current_step=F("step"),
    ).count()


def _reconcile_one(message: Any, *, actor: str, kept: set[tuple[UUID, int]]) -> tuple[bool, int]:
    """(keep the message, rows written) for one message of the DLQ."""
    body = message.payload
    args = body[0] if isinstance(body, list | tuple) and body else []
    try:
        task_id, step = UUID(str(args[0])), int(args[1])
    except (IndexError, TypeError, ValueError):
        logger.error("unreadable message in the dead-letter queue dropped", body=repr(body))
        return False, 0
    if (task_id, step) in kept:
        return False, 0
    letters = DeadLetter.objects.filter(task_id=task_id, step=step)
    task = AgentTask.objects.filter(pk=task_id).values("status", "current_step").first()
    if task is None or task["current_step"] != step:
        return False, 0
    if task["status"] == TaskStatus.DEAD_LETTERED and letters.filter(requeued_at__isnull=True):
        kept.add((task_id, step))
        return True, 0
    deaths = message.headers.get("x-death") or [{}]
    died_at = deaths[0].get("time")  # an AMQP timestamp: whole seconds, UTC
    if isinstance(died_at, datetime) and died_at.tzinfo is None:
        died_at = died_at.replace(tzinfo=UTC)
    requeued = letters.aggregate(last=Max("requeued_at"))["last"]
    if requeued is not None and (not isinstance(died_at, datetime) or died_at <= requeued):
        # The message of a letter an operator requeued since.
        return False, 0
    with transaction.atomic():
        locked = AgentTask.objects.select_for_update().filter(pk=task_id).first()
        if locked is None or locked.current_step != step or locked.status not in RUNNABLE:
            return False, 0
        reason = str(deaths[0].get("reason", "delivery_limit"))
        audit = AuditBatch(locked, actor=actor)
        dead_letter_record(
            locked,
            audit,
            step=step,
            reason=DeadLetter.Reason.DELIVERY_LIMIT,
            error=f"RabbitMQ dead-lettered the step's message ({reason})",
            tb="",
            message={"args": [str(task_id), step], "headers": _plain(message.headers)},
        )
        audit.flush()
        locked.save(update_fields=("audit_seq", "error", *RELEASE_FIELDS, *TRANSITION_FIELDS))
    kept.add((task_id, step))
    return True, 1


def _plain(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if isinstance(v, str | int | bool)}
