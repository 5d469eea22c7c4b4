"""Handing a step to the broker.

Every publish happens inside the transaction that makes the step runnable, after the
task row is locked and before the commit (an outbox without the extra table): a crash
between the two can lose nothing, because either both happen or the step's message
arrives for a step that is not current and is dropped. A worker that receives the
message before the commit waits on the row lock (``agents.core.leases``).

- ``step_publish`` publishes now and raises ``Backpressure`` if the broker refuses
  (down, or the queue at its length limit); its caller's transaction then rolls back,
  so a refused publish changes nothing (task creation, resume, requeue).
- ``step_publish_in_commit`` is the step engine's: its transaction also records the
  step's checkpoint, which must not be lost to a broker outage, so a refused publish
  leaves the step to the stuck-task sweep instead (``in_flight`` back to 0).
- ``current_step_publish`` is for services that resume a task (``agents.core.suspensions``).
- ``publishes_collected`` is for an in-process runner (``python manage.py evaluate``):
  while its block runs, this thread's publishes are collected in a list instead of
  being sent, and the runner executes them itself (``engine.step_execute``).

Messages are sent by task name, so this module imports no task and no engine.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from uuid import UUID

import structlog
from amqp.exceptions import AMQPError, MessageNacked
from django.conf import settings
from kombu import Queue
from kombu.exceptions import KombuError

from agents.definition import Agent, registered_agents
from agents.models import AgentTask
from agents.timeouts import learned_limit
from agents_project import tracing
from agents_project.celery import app
from agents_project.errors import Backpressure
from agents_project.topology import dead_letter_queue, handoff_queue

logger = structlog.get_logger(__name__)

PUBLISH_ERRORS = (KombuError, AMQPError, MessageNacked, OSError)
RUN_STEP = "agents.run_step"

# The publishes of an in-process runner, ``(task id, step)`` in order; None: publish.
_collected: ContextVar[list[tuple[UUID, int]] | None] = ContextVar("collected", default=None)


@contextmanager
def publishes_collected() -> Iterator[list[tuple[UUID, int]]]:
    """While the block runs, every step publish of this thread (and context) is appended
    to the yielded list as ``(task id, step)`` and sent nowhere: the caller runs those
    steps itself with ``agents.core.engine.step_execute``, in order, and removes each
    from the list as it does. Every other guarantee is unchanged: the publish still
    happens inside the transaction that makes the step runnable and counts in
    ``in_flight``, so the stuck-task sweep never publishes such a step a second time.
    Used by ``evals`` (an evaluation run needs no broker); nested blocks each collect
    their own."""
    collected: list[tuple[UUID, int]] = []
    token = _collected.set(collected)
    try:
        yield collected
    finally:
        _collected.reset(token)


def step_time_limits(agent: Agent) -> tuple[float, float]:
    """(soft, hard) time limit of one step of ``agent``, in seconds. The task's deadline
    is enforced when the step runs (``agents.core.leases.deadline_alarm``), on the
    database's clock, not here: a message may wait in the queue for any time."""
    conf = settings.AGENTS
    learned = learned_limit(agent)
    hard = agent.step_time_limit or (learned and learned.step_time_limit) or conf["STEP_TIME_LIMIT"]
    default_soft = (
        hard * 0.8 if learned and not agent.step_time_limit else conf["STEP_SOFT_TIME_LIMIT"]
    )
    soft = agent.step_soft_time_limit or min(default_soft, hard)
    return soft, hard


def step_publish(
    *,
    task_id: UUID,
    step: int,
    agent: Agent,
    limits: tuple[float, float] | None = None,
    handed_back: dict[str, Any] | None = None,
    traceparent: str = "",
) -> None:
    """Publish the message that runs ``step`` of the task; ``Backpressure`` if refused.
    ``limits``: ``step_time_limits(agent)``, when the caller already has them;
    ``handed_back``: what a hand-off's process says of the step (``StepContext``);
    ``traceparent``: the trace context the message carries (default: the current span's,
    when tracing is on; ``agents_project.tracing``).

    Safe to call twice for the same step: the engine drops the second delivery.
    """
    collected = _collected.get()
    if collected is not None:
        collected.append((task_id, step))
        return
    message = _step_message(task_id, step, agent, limits, handed_back, traceparent)
    try:
        _send(
            app.amqp.queues[settings.AGENTS["QUEUE"]],
            message.body,
            message.headers,
            message.properties,
        )
    except PUBLISH_ERRORS as exc:
        logger.warning("step publish refused", task_id=str(task_id), step=step, error=repr(exc))
        raise Backpressure("the work queue cannot take more work now") from exc


def dead_letter_publish(*, task_id: UUID, step: int, agent: Agent) -> None:
    """Put the message of ``step`` in the dead-letter queue, as RabbitMQ puts a rejected
    one there: for a step dead-lettered by a process that ran it without a message of
    the work queue (the model gateway, ``llm.gateway``), so that the DLQ keeps one
    message per open letter (``agents.core.dead_letters``). ``Backpressure`` if refused."""
    message = _step_message(task_id, step, agent, None, None, "")
    try:
        _send(dead_letter_queue(settings.AGENTS), message.body, message.headers, message.properties)
    except PUBLISH_ERRORS as exc:
        raise Backpressure("the dead-letter queue cannot take the message now") from exc


def _step_message(
    task_id: UUID,
    step: int,
    agent: Agent,
    limits: tuple[float, float] | None,
    handed_back: dict[str, Any] | None,
    traceparent: str,
) -> Any:
    soft, hard = limits or step_time_limits(agent)
    args = (str(task_id), step)
    kwargs = {"handed_back": handed_back} if handed_back else {}
    # What ``app.send_task`` sends, without its per-call routing, configuration lookups
    # and argument repr (a step's largest CPU cost; benchmarks/peers.md): the message is
    # built by Celery's own ``app.amqp.as_task_v2`` (task message protocol 2, as a
    # worker reads it) and published to the work queue by a producer of the app's
    # pool (kombu ``Producer.publish``, with its retries).
    message = app.amqp.as_task_v2(
        str(uuid.uuid4()),
        RUN_STEP,
        args=args,
        kwargs=kwargs,
        time_limit=hard,
        soft_time_limit=soft,
        ignore_result=True,
        origin=f"{_HOST}:{os.getpid()}",
        argsrepr=repr(args),
        kwargsrepr=repr(kwargs),
    )
    # When it was published: the worker observes the time in queue
    # (agents_step_queue_seconds) when the step starts.
    message.headers["agents_published_at"] = time.time()
    if tracing.ENABLED:
        traceparent = traceparent or tracing.current_traceparent()
        if traceparent:
            message.headers["traceparent"] = traceparent
    return message


def handoff_publish(*, body: dict[str, Any]) -> None:
    """Publish ``body`` (JSON) to the hand-off queue (``AGENTS_HANDOFF_QUEUE``), confirmed
    by the broker; ``Backpressure`` if refused."""
    try:
        _send(handoff_queue(settings.AGENTS), body, {}, {})
    except PUBLISH_ERRORS as exc:
        logger.warning("hand-off publish refused", error=repr(exc))
        raise Backpressure("the hand-off queue cannot take more work now") from exc


def _send(queue: Queue, body: Any, headers: dict[str, Any], properties: dict[str, Any]) -> None:
    # A producer of the app's pool (kombu ``Producer.publish``, with its retries); the
    # pool's connections publish with confirms (``broker_transport_options``).
    with app.producer_pool.acquire(block=True) as producer:
        bound = _queue_bound_to(producer.channel, queue)
        producer.publish(
            body,
            exchange=bound.exchange,
            routing_key=bound.routing_key,
            serializer="json",
            headers=headers,
            delivery_mode=2,
            declare=[bound],
            retry=True,
            retry_policy=_RETRY_POLICY,
            **properties,
        )


_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}
# The work queue bound to each producer channel, by queue name. kombu's ``maybe_declare``
# copies an unbound queue onto the channel at every publish before it finds the
# declaration cached (``kombu.common._ensure_channel_is_bound``); a bound one is used as
# is, and kombu rebinds it itself after a reconnect (``_imaybe_declare``: ``revive``).
_BOUND: weakref.WeakKeyDictionary[Any, dict[str, Queue]] = weakref.WeakKeyDictionary()


def _queue_bound_to(channel: Any, queue: Queue) -> Queue:
    bound = _BOUND.setdefault(channel, {})
    if queue.name not in bound:
        bound[queue.name] = queue.bind(channel)
    return bound[queue.name]


_HOST = socket.gethostname()


def publishes_are_collected() -> bool:
    """True inside ``publishes_collected``: this thread's publishes go to a list."""
    return _collected.get() is not None


def step_publish_in_commit(*, task: AgentTask, agent: Agent) -> None:
    """Publish the task's current step from inside the step's commit (row locked, saved
    with ``in_flight = 1``). If the broker refuses, the commit still goes ahead with
    ``in_flight = 0``, and the stuck-task sweep publishes the step when it can."""
    try:
        step_publish(task_id=task.pk, step=task.current_step, agent=agent)
    except Backpressure:
        step_unpublished(task=task)


def step_unpublished(*, task: AgentTask) -> None:
    """The broker refused the current step's message inside the step's commit: save
    ``in_flight = 0`` in that commit, so the stuck-task sweep publishes it later."""
    logger.error(
        "step not published; the stuck-task sweep will publish it",
        task_id=str(task.pk),
        step=task.current_step,
    )
    task.in_flight = 0
    AgentTask.objects.filter(pk=task.pk).update(in_flight=0)


def current_step_publish(*, task: AgentTask) -> bool:
    """Publish the task's current step now, inside the caller's transaction (task row
    locked), and count it in ``task.in_flight`` (the caller saves ``in_flight``).

    Raises ``Backpressure`` if the broker refuses: the caller's transaction rolls back.
    False when this process does not know the task's agent: then a worker that does
    publishes it in its stuck-task sweep.
    """
    agent = registered_agents().get(task.agent_name)
    if agent is None:
        logger.error("agent not registered here; step not published", agent=task.agent_name)
        return False
    step_publish(task_id=task.pk, step=task.current_step, agent=agent)
    task.in_flight = max(task.in_flight, 0) + 1
    return True
