"""The scheduler: the runtime's clock, run by every worker (``agents_project.celery``).

Each tick (``AGENTS_SCHEDULER_INTERVAL``, 1 s by default) it:

- publishes again the steps whose retry backoff has passed (``AgentTask.retry_at``);
- wakes durable timers and ends approval and event waits whose timeout has passed;
- ends tasks whose deadline has passed, wherever they are (``timed_out``);
- publishes again the current step of any pending or running task that has made no
  progress for ``AGENTS_STUCK_AFTER`` seconds and has no retry pending: the safety net
  for a publish that never reached the broker, or a message the broker lost.

All state is in the database, so a restarted scheduler carries on where any other left
off; several workers running it at once is safe, because every action locks the task
row and re-checks it (and skips a row another scheduler holds).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from agents import scheduling
from agents.definition import registered_agents
from agents.dispatch import current_step_publish_after_commit
from agents.models import ACTIVE_STATUSES, AgentTask, Suspension
from agents.state_machine import RUNNABLE
from audit.models import EventType
from audit.services import AuditBatch, process_actor

logger = structlog.get_logger(__name__)

BATCH = 200


def retries_fire() -> int:
    """Publish the steps whose retry backoff has passed."""
    fired = 0
    due = AgentTask.objects.filter(retry_at__lte=timezone.now()).values_list("pk", flat=True)
    for task_id in list(due[:BATCH]):
        with transaction.atomic():
            task = (
                AgentTask.objects.select_for_update(skip_locked=True)
                .filter(pk=task_id, retry_at__lte=timezone.now())
                .first()
            )
            if task is None:
                continue
            task.retry_at = None
            task.save(update_fields=("retry_at",))
            if task.status in RUNNABLE and current_step_publish_after_commit(task=task):
                fired += 1
    return fired


def suspensions_expire(*, actor: str) -> int:
    due = Suspension.objects.filter(
        resolved_at__isnull=True, wake_at__lte=timezone.now()
    ).values_list("pk", flat=True)
    return sum(
        scheduling.suspension_expire(suspension_id=pk, actor=actor) for pk in list(due[:BATCH])
    )


def deadlines_enforce(*, actor: str) -> int:
    due = AgentTask.objects.filter(
        deadline__isnull=False, deadline__lte=timezone.now(), status__in=ACTIVE_STATUSES
    ).values_list("pk", flat=True)
    return sum(scheduling.task_time_out(task_id=pk, actor=actor) for pk in list(due[:BATCH]))


def stuck_tasks(*, stuck_after: float | None = None) -> QuerySet[AgentTask]:
    """Pending or running tasks with no progress for ``stuck_after`` seconds (default
    ``AGENTS_STUCK_AFTER``) and no retry pending: their step message may be lost."""
    stuck_after = settings.AGENTS["STUCK_AFTER"] if stuck_after is None else stuck_after
    cutoff = timezone.now() - timedelta(seconds=stuck_after)
    return AgentTask.objects.filter(
        status__in=RUNNABLE, updated_at__lt=cutoff, retry_at__isnull=True
    ).order_by("updated_at")


def stuck_tasks_republish(*, actor: str, stuck_after: float | None = None) -> int:
    """Publish again the current step of runnable tasks with no progress for a while.

    Safe however often it runs: a duplicate message for a step is dropped by the engine.
    """
    stuck_after = settings.AGENTS["STUCK_AFTER"] if stuck_after is None else stuck_after
    cutoff = timezone.now() - timedelta(seconds=stuck_after)
    stuck = stuck_tasks(stuck_after=stuck_after).values_list("pk", flat=True)
    republished = 0
    for task_id in list(stuck[:BATCH]):
        with transaction.atomic():
            task = (
                AgentTask.objects.select_for_update(skip_locked=True)
                .filter(pk=task_id, status__in=RUNNABLE, updated_at__lt=cutoff)
                .first()
            )
            if task is None or task.agent_name not in registered_agents():
                continue
            task.updated_at = timezone.now()
            audit = AuditBatch(task, actor=actor)
            audit.add(
                EventType.REPUBLISHED,
                {"reason": f"no progress for {stuck_after:g} s"},
                step=task.current_step,
            )
            audit.flush()
            task.save(update_fields=("updated_at", "audit_seq"))
            current_step_publish_after_commit(task=task)
            republished += 1
    if republished:
        logger.warning("stuck tasks published again", count=republished)
    return republished


def tick(*, actor: str) -> dict[str, int]:
    """One pass of the clock. Returns how many of each thing it did."""
    return {
        "retries": retries_fire(),
        "wakeups": suspensions_expire(actor=actor),
        "deadlines": deadlines_enforce(actor=actor),
        "republished": stuck_tasks_republish(actor=actor),
    }


class Scheduler:
    """Runs ``tick`` every ``interval`` seconds in a thread until ``stop`` is called."""

    def __init__(self, *, interval: float | None = None) -> None:
        self.interval = settings.AGENTS["SCHEDULER_INTERVAL"] if interval is None else interval
        self.actor = process_actor("scheduler")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agents-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        logger.info("scheduler started", interval=self.interval)
        while not self._stop.wait(self.interval):
            try:
                tick(actor=self.actor)
            except Exception:
                # The database may be restarting: try again next tick.
                logger.exception("scheduler tick failed")
            finally:
                # Hold no connection between ticks: this thread lives in the worker's
                # main process, which forks pool children, and a child must not
                # inherit a live connection that belongs to this thread.
                connection.close()
