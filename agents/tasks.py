"""Celery tasks of the agents app. Thin: translate the message, call the engine."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from celery import Task, shared_task
from celery.exceptions import Reject

from agents.core.engine import step_execute
from agents.core.results import StepResult


@shared_task(
    bind=True,
    name="agents.run_step",
    acks_late=True,
    reject_on_worker_lost=True,
    # Killed by its hard time limit: give the message back (Celery's default acks it),
    # so the redelivery takes over the expired lease and counts it like a lost worker.
    acks_on_timeout=False,
    ignore_result=True,
)
def run_step(self: Task, task_id: str, step: int, handed_back: dict[str, Any] | None = None) -> str:
    """Run one step of one agent task.

    Safe to run twice, even at once: the engine's lease lets one copy run the step and
    drops the others. Never retried by Celery: a failing step's retry is scheduled in
    the database with backoff. If this process dies or the step hits its hard time
    limit, the message goes back to the queue (acks late, reject on worker lost, no ack
    on timeout) and its redelivery takes over the lease once it expires; after
    ``AGENTS_MAX_WORKER_LOSSES`` such take-overs, or when the step's retries are spent,
    the task is dead-lettered and the message rejected into the DLQ. If the database
    stays away longer than ``AGENTS_DATABASE_PATIENCE``, the message is given back.
    ``handed_back``: what a hand-off's process says of the step (``agents.core.handoffs``).
    """
    request = self.request
    delivery: dict[str, Any] = request.delivery_info or {}
    message = {
        "task": self.name,
        "id": request.id,
        "args": [task_id, step],
        "delivery_info": {k: v for k, v in delivery.items() if isinstance(v, str | int | bool)},
    }
    result = step_execute(
        task_id=UUID(task_id),
        step=step,
        message=message,
        node=request.hostname or "local",
        published_at=request.get("agents_published_at"),
        handed_back=handed_back,
        traceparent=request.get("traceparent") or "",
    )
    if result == StepResult.DEAD_LETTERED:
        raise Reject(f"task {task_id} dead-lettered at step {step}", requeue=False)
    if result == StepResult.REQUEUE:
        raise Reject(f"task {task_id} step {step}: database unavailable", requeue=True)
    return result.value
