"""Handing a step to the broker.

Two ways, for two situations:

- ``step_publish`` publishes now and raises ``Backpressure`` if the broker refuses
  (down, or the queue at its length limit). Task creation calls it inside its
  transaction, so a refused publish leaves nothing behind.
- ``step_publish_or_sweep`` (and ``step_publish_after_commit``) publish for a task
  whose progress is already committed; a failure is logged and left to the scheduler's
  stuck-task sweep, which publishes the step again: nothing is lost, only delayed.
"""

from __future__ import annotations

from uuid import UUID

import structlog
from amqp.exceptions import AMQPError, MessageNacked
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import KombuError

from agents.definition import Agent, registered_agents
from agents.models import AgentTask
from agents.timeouts import learned_limit
from agents_project.errors import Backpressure

logger = structlog.get_logger(__name__)

PUBLISH_ERRORS = (KombuError, AMQPError, MessageNacked, OSError)


def step_time_limits(agent: Agent) -> tuple[float, float]:
    """(soft, hard) time limit of one step of ``agent``, in seconds."""
    conf = settings.AGENTS
    learned = learned_limit(agent)
    hard = agent.step_time_limit or (learned and learned.step_time_limit) or conf["STEP_TIME_LIMIT"]
    default_soft = (
        hard * 0.8 if learned and not agent.step_time_limit else conf["STEP_SOFT_TIME_LIMIT"]
    )
    soft = agent.step_soft_time_limit or min(default_soft, hard)
    return soft, hard


def step_publish(*, task_id: UUID, step: int, agent: Agent, deadline=None) -> None:
    """Publish the message that runs ``step`` of the task; ``Backpressure`` if refused.

    Safe to call twice for the same step: the engine drops the second delivery.
    """
    from agents.tasks import run_step

    soft, hard = step_time_limits(agent)
    if deadline is not None:
        # A step never outlives its task's deadline (plus a moment to record the end).
        remaining = max((deadline - timezone.now()).total_seconds(), 0.0) + 1.0
        hard = min(hard, remaining)
        soft = min(soft, hard)
    try:
        run_step.apply_async(
            args=(str(task_id), step),
            soft_time_limit=soft,
            time_limit=hard,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except PUBLISH_ERRORS as exc:
        logger.warning("step publish refused", task_id=str(task_id), step=step, error=repr(exc))
        raise Backpressure("the work queue cannot take more work now") from exc


def step_publish_or_sweep(*, task_id: UUID, step: int, agent: Agent, deadline=None) -> None:
    """Publish now; if the broker refuses, log it and leave the step to the stuck-task sweep.

    For steps whose task is already committed as runnable: nothing is lost by a failed
    publish, the sweep finds the task within ``AGENTS_STUCK_AFTER`` seconds.
    """
    try:
        step_publish(task_id=task_id, step=step, agent=agent, deadline=deadline)
    except Backpressure:
        logger.error(
            "step not published; the stuck-task sweep will publish it",
            task_id=str(task_id),
            step=step,
        )


def current_step_publish_after_commit(*, task: AgentTask) -> bool:
    """Publish the task's current step once the transaction commits. False when this
    process does not know the task's agent: then a worker that does will find the task
    in its stuck-task sweep."""
    agent = registered_agents().get(task.agent_name)
    if agent is None:
        logger.error("agent not registered here; step not published", agent=task.agent_name)
        return False
    step_publish_after_commit(
        task_id=task.pk, step=task.current_step, agent=agent, deadline=task.deadline
    )
    return True


def step_publish_after_commit(*, task_id: UUID, step: int, agent: Agent, deadline=None) -> None:
    """``step_publish_or_sweep`` once the current transaction commits."""
    transaction.on_commit(
        lambda: step_publish_or_sweep(task_id=task_id, step=step, agent=agent, deadline=deadline)
    )
