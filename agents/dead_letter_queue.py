"""The broker side of dead letters: RabbitMQ's dead-letter queue.

A dead-lettered step's message sits in the DLQ (``AGENTS_DEAD_LETTER_QUEUE``) for
inspection with RabbitMQ's own tools. When the task is requeued, its messages are taken
out of the DLQ, so the queue only holds what still needs an operator.
"""

from __future__ import annotations

from uuid import UUID

import structlog
from django.conf import settings

from agents_project.celery import app
from agents_project.topology import dead_letter_queue

logger = structlog.get_logger(__name__)


def dead_letter_queue_remove(*, task_id: UUID) -> int:
    """Remove the task's messages from the DLQ; return how many. Safe to call twice."""
    if not settings.BROKER_IS_AMQP:
        return 0
    removed = 0
    held = []
    with app.connection_for_write() as conn:
        queue = dead_letter_queue(settings.AGENTS)(conn.default_channel)
        _, depth, _ = queue.queue_declare(passive=True)
        for _ in range(depth):
            message = queue.get(no_ack=False)
            if message is None:
                break
            args = message.payload[0] if isinstance(message.payload, list | tuple) else []
            if args and args[0] == str(task_id):
                message.ack()
                removed += 1
            else:
                held.append(message)
        # Everything else goes back where it was, untouched.
        for message in held:
            message.reject(requeue=True)
    if removed:
        logger.info(
            "messages removed from the dead-letter queue", task_id=str(task_id), count=removed
        )
    return removed
