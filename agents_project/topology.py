"""The broker topology the app declares: a work queue and its dead-letter queue.

On RabbitMQ the work queue is a durable quorum queue (replicated, and it counts
redeliveries) with:

- a dead-letter exchange and queue, where rejected messages go (at-least-once
  dead-lettering, which RabbitMQ allows with ``x-overflow: reject-publish``);
- ``x-delivery-limit``: a message returned this many times (it keeps killing the
  workers that take it) is dead-lettered by the broker itself;
- ``x-max-length`` with ``reject-publish``: beyond it, publishes are refused (nacked),
  which is the backpressure that task creation turns into HTTP 503.

Other brokers (the embedded one) get a plain durable queue: they know no arguments.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue


def work_queue(conf: dict[str, Any], *, amqp: bool) -> Queue:
    name = conf["QUEUE"]
    arguments = None
    if amqp:
        arguments = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": conf["DEAD_LETTER_EXCHANGE"],
            "x-dead-letter-routing-key": conf["DEAD_LETTER_QUEUE"],
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": conf["DELIVERY_LIMIT"],
            "x-max-length": conf["QUEUE_MAX_LENGTH"],
        }
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=arguments,
    )


def handoff_queue(conf: dict[str, Any]) -> Queue:
    """The queue of handed-off steps (``agents.core.handoffs``): durable and quorum, so
    an accepted hand-off survives a broker restart; no dead-lettering (its consumer
    hands a step it cannot serve back to the work queue instead)."""
    name = conf["HANDOFF_QUEUE"]
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def dead_letter_queue(conf: dict[str, Any]) -> Queue:
    exchange = Exchange(conf["DEAD_LETTER_EXCHANGE"], type="direct", durable=True)
    return Queue(
        conf["DEAD_LETTER_QUEUE"],
        exchange,
        routing_key=conf["DEAD_LETTER_QUEUE"],
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
