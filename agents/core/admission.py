"""Fair sharing between owners: a limit on each owner's tasks running at once.

Without it the work queue is first-in first-out for everyone, and an owner who submits
thousands of tasks delays every other owner's first step behind them (issue 12, item 9).

**The limits.** ``AGENTS_OWNER_MAX_RUNNING`` (0: unlimited) caps the *admitted* tasks of
one owner over all agents; an agent's ``max_running_per_owner`` (None: none of its own)
caps that owner's admitted tasks of that agent. A task is admitted when it may have a
step queued or running: ``pending`` or ``running`` with ``queued_for_admission`` false.
Suspended tasks are not counted: they hold no worker and no message, and counting them
would let one owner's long approval waits block its own other work for days. A task
waiting out a retry backoff is counted (it keeps its place and runs again soon).

**Over the limit.** ``task_start`` (``agents.services``) creates the task ``pending``
with ``queued_for_admission`` true, ``in_flight`` 0 and *no broker message*, so it
cannot clog the queue; so do new tasks of an owner that already has tasks waiting
(first come, first admitted, within one owner). The stuck-task sweep skips such tasks
(``agents.core.scheduler.stuck_tasks``).

**Admission.** Every scheduler tick calls ``admissions_grant``: in rounds, each owner
with waiting tasks and free capacity gets its oldest admissible waiting task admitted,
one per owner per round (round-robin), until no owner can take more or ``BATCH`` were
admitted. Admitting a task clears the flag and publishes its current step inside the
transaction that does so (``dispatch.current_step_publish``), like every publish.

**Races.** Every count-and-admit for one owner holds a transaction-scoped advisory
lock keyed by the owner (``owner_admission_lock``), so two requests or two schedulers
can never both take the last free place.
"""

from __future__ import annotations

from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction

from agents.core import clock
from agents.core.dispatch import current_step_publish
from agents.core.state_machine import RUNNABLE
from agents.definition import Agent, registered_agents
from agents.models import AgentTask, TaskStatus
from agents_project.errors import Backpressure

logger = structlog.get_logger(__name__)

BATCH = 200


def owner_limit() -> int:
    """``AGENTS_OWNER_MAX_RUNNING``: admitted tasks per owner, all agents; 0 = unlimited."""
    return max(int(settings.AGENTS["OWNER_MAX_RUNNING"]), 0)


def agent_limit(agent: Agent) -> int:
    """The agent's own per-owner limit; 0 = none."""
    return max(int(agent.max_running_per_owner or 0), 0)


def limits_apply(agent: Agent) -> bool:
    """Whether any limit can hold back a task of ``agent`` (else admission is skipped)."""
    return owner_limit() > 0 or agent_limit(agent) > 0


def owner_admission_lock(*, owner_id: int) -> None:
    """Take, until the current transaction ends, the advisory lock of ``owner_id``'s
    admissions. A no-op outside PostgreSQL."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                [f"agents.admission:{owner_id}"],
            )


def _admitted(owner_id: int) -> Any:
    return AgentTask.objects.filter(
        owner_id=owner_id, status__in=RUNNABLE, queued_for_admission=False
    )


def has_capacity(*, owner_id: int, agent: Agent, exclude: Any = None) -> bool:
    """Whether one more task of ``agent`` for ``owner_id`` may be admitted now. Call
    with ``owner_admission_lock`` held. ``exclude``: a task id not to count (the task
    being decided on, when it is already written)."""
    admitted = _admitted(owner_id)
    if exclude is not None:
        admitted = admitted.exclude(pk=exclude)
    total = owner_limit()
    if total and admitted.count() >= total:
        return False
    per_agent = agent_limit(agent)
    return not (per_agent and admitted.filter(agent_name=agent.name).count() >= per_agent)


def waiting(*, owner_id: int) -> Any:
    """The owner's tasks waiting for admission, oldest first."""
    return AgentTask.objects.filter(
        owner_id=owner_id, status=TaskStatus.PENDING, queued_for_admission=True
    ).order_by("created_at", "pk")


def admission_needed(*, owner_id: int, agent: Agent) -> bool:
    """For a task about to be created (call inside its transaction): True when it must
    wait for admission, because the owner is at a limit or already has tasks waiting.
    Takes the owner's admission lock."""
    if not limits_apply(agent):
        return False
    owner_admission_lock(owner_id=owner_id)
    return waiting(owner_id=owner_id).exists() or not has_capacity(owner_id=owner_id, agent=agent)


def _admit_one(owner_id: int, agents: dict[str, Agent]) -> bool:
    """Admit the oldest waiting task of ``owner_id`` that fits its limits and whose agent
    this process knows. True if one was admitted. Raises ``Backpressure`` (nothing
    changed) if the broker refuses the step."""
    with transaction.atomic():
        owner_admission_lock(owner_id=owner_id)
        total = owner_limit()
        admitted = _admitted(owner_id)
        if total and admitted.count() >= total:
            return False
        full: set[str] = set()
        names = waiting(owner_id=owner_id).order_by().values_list("agent_name", flat=True)
        for name in set(names.distinct()):
            agent = agents.get(name)
            if agent is None or (
                agent_limit(agent)
                and admitted.filter(agent_name=name).count() >= agent_limit(agent)
            ):
                full.add(name)
        task = (
            waiting(owner_id=owner_id)
            .exclude(agent_name__in=full)
            .select_for_update(skip_locked=True, of=("self",))
            .defer("input", "result")
            .first()
        )
        if task is None:
            return False
        task.queued_for_admission = False
        task.in_flight = 0
        # When the step was published: the takeover sweep measures its grace from here.
        task.updated_at = clock.now()
        if not current_step_publish(task=task):
            return False
        task.save(update_fields=("queued_for_admission", "in_flight", "updated_at"))
        return True


def admissions_grant(*, limit: int = BATCH) -> int:
    """Admit waiting tasks, round-robin across owners (one per owner per round), as
    far as their limits allow; at most ``limit``. Returns how many. Stops at the first
    refused publish (the next tick tries again)."""
    agents = dict(registered_agents())
    if not agents:
        return 0
    owners = list(
        AgentTask.objects.filter(
            status=TaskStatus.PENDING, queued_for_admission=True, agent_name__in=list(agents)
        )
        .order_by("owner_id")
        .values_list("owner_id", flat=True)
        .distinct()
    )
    admitted = 0
    try:
        while owners and admitted < limit:
            still = []
            for owner_id in owners:
                if admitted >= limit:
                    break
                if _admit_one(owner_id, agents):
                    admitted += 1
                    still.append(owner_id)
            owners = still
    except Backpressure:
        logger.warning("admission paused: the work queue refuses more work")
    if admitted:
        logger.info("tasks admitted", count=admitted)
    return admitted
