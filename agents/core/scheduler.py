"""The scheduler: the runtime's clock, run by every worker (``agents_project.celery``).

Each tick (``AGENTS_SCHEDULER_INTERVAL``, 1 s by default), on the database's clock:

- publishes again the steps whose retry backoff has passed (``AgentTask.retry_at``);
- wakes durable timers and ends approval and event waits whose timeout has passed;
- ends tasks whose deadline has passed, wherever they are (``timed_out``);
- sweeps: publishes the current step of any runnable task that has no live lease, no
  message that can still arrive (``in_flight`` 0) and no retry pending. That is a step
  whose publish the broker refused, or whose last message was consumed as a duplicate
  while its holder then died. It selects only rows this worker can act on (agents it
  knows, at a state version it can run), so rows it cannot act on never fill its
  batch; and only tasks pinned to a version this worker's code serves
  (``agents.core.versions``), so a parked step goes only to a worker of its version;
- takes over vanished holders and lost messages (``vanished_tasks_republish``): a step
  with a message counted in flight is published again when its lease expired more
  than ``AGENTS_SWEEP_GRACE`` seconds ago (its holder is cut off or its host gone,
  and nothing renews it; the message, or the commit that released it, may be lost),
  once per lease (``swept_fence``); and a step never claimed, published more than that
  grace ago, when the work queue holds no ready message on two sweeps running (its
  message is neither waiting nor taken: lost). A long step renews its lease and a
  backlog keeps messages ready, so neither is ever copied;
- admits tasks waiting for their owner's limit of tasks running at once, round-robin
  across owners (``agents.core.admission``);
- runs the jobs its worker gives it (``Scheduler(jobs=...)``): the worker gives it
  ``agents.schedules.schedules_fire``, which starts the tasks of due schedules. Firing
  starts tasks through ``agents.services.task_start`` (the one place a task is
  created), which sits above the core, so the core takes it as a job rather than
  importing it;
- every ``AGENTS_WORKER_TTL / 3`` seconds, announces the agent versions this worker
  serves (``agents.models.WorkerVersion``); ``stop`` withdraws them;
- every ``AGENTS_DLQ_RECONCILE_INTERVAL`` seconds, drains RabbitMQ's dead-letter queue
  into ``DeadLetter`` rows (``agents.core.dead_letters``).

All state is in the database, so a restarted scheduler carries on where any other left
off; several workers running it at once is safe, because every action locks the task
row and re-checks it, skipping rows another scheduler holds.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from functools import reduce
from operator import or_
from uuid import UUID

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q, QuerySet

from agents.core import clock, suspensions
from agents.core.admission import admissions_grant
from agents.core.children import orphans_cancel
from agents.core.dead_letters import dead_letter_queue_reconcile
from agents.core.dispatch import current_step_publish
from agents.core.state_machine import RUNNABLE
from agents.core.versions import worker_ttl, worker_versions_announce, worker_versions_withdraw
from agents.definition import registered_agents
from agents.models import ACTIVE_STATUSES, AgentTask, Suspension
from agents_project.celery import app
from agents_project.errors import Backpressure
from audit.models import EventType
from audit.services import AuditBatch, process_actor

logger = structlog.get_logger(__name__)

BATCH = 200


def retries_fire() -> int:
    """Publish the steps whose retry backoff has passed."""

    def fire(task: AgentTask) -> None:
        task.retry_at = None
        # When the step was published: the takeover sweep measures its grace from here.
        task.updated_at = clock.now()
        current_step_publish(task=task)
        task.save(update_fields=("retry_at", "in_flight", "updated_at"))

    return _each_locked(
        AgentTask.objects.filter(retry_at__lte=clock.now(), status__in=RUNNABLE), fire
    )


def suspensions_expire(*, actor: str) -> int:
    due = Suspension.objects.filter(resolved_at__isnull=True, wake_at__lte=clock.now()).values_list(
        "pk", flat=True
    )
    return sum(
        suspensions.suspension_expire(suspension_id=pk, actor=actor) for pk in list(due[:BATCH])
    )


def deadlines_enforce(*, actor: str) -> int:
    due = AgentTask.objects.filter(
        deadline__isnull=False, deadline__lte=clock.now(), status__in=ACTIVE_STATUSES
    ).values_list("pk", flat=True)
    return sum(suspensions.task_time_out(task_id=pk, actor=actor) for pk in list(due[:BATCH]))


def stuck_tasks(*, include_queued: bool = False) -> QuerySet[AgentTask]:
    """Runnable tasks whose current step nothing will run: no retry pending, no live
    lease and no message that can still arrive; limited to the agents this process
    knows, at a state version it can run, pinned to a version it serves. Tasks waiting
    for admission (``agents.core.admission``) are never stuck: they have no message on
    purpose. ``include_queued`` drops the lease and message conditions (an operator's
    ``resume_stuck --include-queued`` after a queue was purged, or the demo after its
    worker was killed with its embedded broker's message)."""
    runnable_here = _runnable_here()
    if runnable_here is None:
        return AgentTask.objects.none()
    now = clock.now()
    tasks = AgentTask.objects.filter(
        runnable_here, status__in=RUNNABLE, retry_at__isnull=True, queued_for_admission=False
    )
    if not include_queued:
        tasks = tasks.filter(in_flight__lte=0).filter(
            Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)
        )
    return tasks.order_by("updated_at")


def sweep_grace() -> float:
    """Seconds a counted message may go unseen before the sweep takes its step for
    vanished (``AGENTS_SWEEP_GRACE``)."""
    return float(settings.AGENTS["SWEEP_GRACE"])


def _runnable_here() -> Q | None:
    agents = registered_agents()
    if not agents:
        return None
    return reduce(
        or_,
        (
            Q(agent_name=name)
            & Q(agent_version__in=[a.version, *a.compatible_versions])
            & (Q(needs_state_version__isnull=True) | Q(needs_state_version__lte=a.state_version))
            for name, a in agents.items()
        ),
    )


def vanished_tasks(*, unclaimed: bool) -> QuerySet[AgentTask]:
    """Runnable tasks of this worker with a message counted in flight whose step nothing
    is seen running (see the module's docstring), oldest first.

    Not ``unclaimed``: the lease expired more than ``AGENTS_SWEEP_GRACE`` seconds ago
    and the sweep has not yet published the step for this lease (``swept_fence``).
    ``unclaimed``: no lease, or an expired one the sweep already acted on, and the last
    publish (``updated_at``) more than the grace ago; the caller checks the queue."""
    runnable_here = _runnable_here()
    if runnable_here is None:
        return AgentTask.objects.none()
    before = clock.now() - timedelta(seconds=sweep_grace())
    tasks = AgentTask.objects.filter(
        runnable_here,
        status__in=RUNNABLE,
        retry_at__isnull=True,
        queued_for_admission=False,
        in_flight__gt=0,
    )
    expired = Q(lease_expires_at__lt=before)
    swept = Q(swept_fence=F("fence"))
    if unclaimed:
        tasks = tasks.filter(
            (Q(lease_expires_at__isnull=True) | (expired & swept)), updated_at__lt=before
        )
    else:
        tasks = tasks.filter(expired).exclude(swept)
    return tasks.order_by("updated_at")


# Tasks the last sweep found unclaimed with an empty queue: {task id: (step, fence)}.
# One sighting may be a message the broker handed over a millisecond before its claim;
# the same task seen again on the next sweep, the queue still empty, is not.
_unclaimed_seen: dict[UUID, tuple[int, int]] = {}


def vanished_tasks_republish(*, actor: str) -> int:
    """Publish again the steps ``vanished_tasks`` finds: each lease's step once (the
    late holder, if it lives, is kept out by the fence), and a never-claimed step
    whose message is neither in the queue nor taken. Returns how many."""

    def republish(reason: str) -> Callable[[AgentTask], None]:
        def act(task: AgentTask) -> None:
            audit = AuditBatch(task, actor=actor)
            audit.add(
                EventType.REPUBLISHED,
                {
                    "reason": reason,
                    "in_flight": task.in_flight,
                    "lease_expired_at": (
                        task.lease_expires_at.isoformat() if task.lease_expires_at else None
                    ),
                },
                step=task.current_step,
            )
            task.swept_fence = task.fence
            task.updated_at = clock.now()
            current_step_publish(task=task)
            audit.flush()
            task.save(update_fields=("audit_seq", "in_flight", "swept_fence", "updated_at"))

        return act

    done = _each_locked(
        vanished_tasks(unclaimed=False),
        republish("lease expired and not renewed: holder vanished or its message lost"),
    )
    suspects = {
        pk: (step, fence)
        for pk, step, fence in vanished_tasks(unclaimed=True).values_list(
            "pk", "current_step", "fence"
        )[:BATCH]
    }
    if suspects and work_queue_ready() == 0:
        confirmed = [pk for pk, seen in suspects.items() if _unclaimed_seen.get(pk) == seen]
        _unclaimed_seen.clear()
        _unclaimed_seen.update(suspects)
        if confirmed:
            done += _each_locked(
                vanished_tasks(unclaimed=True).filter(pk__in=confirmed),
                republish("message neither queued nor taken: lost"),
            )
    else:
        _unclaimed_seen.clear()
    if done:
        logger.warning("steps of vanished holders or lost messages published again", count=done)
    return done


def work_queue_ready() -> int | None:
    """Messages ready in the work queue (waiting for a consumer), or None when the
    broker cannot say (away, or a transport that does not count)."""
    try:
        with app.connection_for_write() as conn:
            declared = conn.default_channel.queue_declare(
                queue=settings.AGENTS["QUEUE"], passive=True
            )
        return int(declared.message_count)
    except Exception as exc:  # the broker may be away: act on nothing unclaimed
        logger.info("work queue depth unknown", error=repr(exc))
        return None


def stuck_tasks_republish(*, actor: str, include_queued: bool = False) -> int:
    """Publish the current step of every task ``stuck_tasks`` finds, counting the new
    message in ``in_flight``. Safe however often it runs: every candidate is locked
    and checked again, and a duplicate message is dropped by the engine.

    ``include_queued`` also publishes steps whose message is counted as still queued:
    for an operator who purged or lost a queue (``resume_stuck --include-queued``).
    """

    def republish(task: AgentTask) -> None:
        audit = AuditBatch(task, actor=actor)
        audit.add(
            EventType.REPUBLISHED,
            {"reason": "no live copy and no message left", "in_flight": task.in_flight},
            step=task.current_step,
        )
        if include_queued:
            task.in_flight = 0
        current_step_publish(task=task)
        audit.flush()
        task.save(update_fields=("audit_seq", "in_flight"))

    republished = _each_locked(stuck_tasks(include_queued=include_queued), republish)
    if republished:
        logger.warning("stuck tasks published again", count=republished)
    return republished


def _each_locked(candidates: QuerySet[AgentTask], act: Callable[[AgentTask], None]) -> int:
    """Apply ``act`` to up to ``BATCH`` of ``candidates``, each locked in its own
    transaction, and return how many. Rows another process holds are skipped, not
    waited for; the condition is checked again under the lock. Stops at the first
    refused publish (the broker is full or away: the next tick tries again)."""
    done = 0
    for task_id in list(candidates.values_list("pk", flat=True)[:BATCH]):
        try:
            with transaction.atomic():
                task = (
                    candidates.select_for_update(skip_locked=True, of=("self",))
                    .defer("input", "result")
                    .filter(pk=task_id)
                    .first()
                )
                if task is None:
                    continue
                act(task)
                done += 1
        except Backpressure:
            break
    return done


Job = Callable[..., int]


def tick(*, actor: str, jobs: dict[str, Job] | None = None) -> dict[str, int]:
    """One pass of the clock, then each of ``jobs`` (``name: job(actor=...)``). Returns
    how many of each thing it did."""
    done = {
        "retries": retries_fire(),
        "wakeups": suspensions_expire(actor=actor),
        "deadlines": deadlines_enforce(actor=actor),
        "republished": stuck_tasks_republish(actor=actor),
        "taken_over": vanished_tasks_republish(actor=actor),
        "admitted": admissions_grant(),
        "orphans_cancelled": orphans_cancel(actor=actor),
    }
    for name, job in (jobs or {}).items():
        done[name] = job(actor=actor)
    return done


class Scheduler:
    """Runs ``tick`` every ``interval`` seconds in a thread until ``stop`` is called."""

    def __init__(
        self, *, interval: float | None = None, jobs: dict[str, Job] | None = None
    ) -> None:
        self.interval = settings.AGENTS["SCHEDULER_INTERVAL"] if interval is None else interval
        self.jobs = dict(jobs or {})
        self.actor = process_actor("scheduler")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reconciled_at = float("-inf")
        self._announced_at = float("-inf")
        # The worker, as it announces the versions it serves: its main process.
        self.worker = process_actor("worker")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agents-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            worker_versions_withdraw(worker=self.worker)
        except Exception:
            # The database may be away: the announcement then expires by itself.
            logger.exception("could not withdraw this worker's versions")
        finally:
            connection.close()

    def announce(self) -> None:
        """Announce the versions this worker serves, at most every ``WORKER_TTL / 3``."""
        if time.monotonic() - self._announced_at >= worker_ttl() / 3:
            worker_versions_announce(worker=self.worker)
            self._announced_at = time.monotonic()

    def _run(self) -> None:
        logger.info("scheduler started", interval=self.interval)
        # Jittered: the sweeps of many workers then publish at varied moments, so the
        # broker's round-robin cannot hand a parked step to the wrong version's worker
        # in lock-step, tick after tick.
        while not self._stop.wait(self.interval * random.uniform(0.5, 1.5)):
            try:
                self.announce()
                tick(actor=self.actor, jobs=self.jobs)
                every = settings.AGENTS["DLQ_RECONCILE_INTERVAL"]
                if every > 0 and time.monotonic() - self._reconciled_at >= every:
                    self._reconciled_at = time.monotonic()
                    dead_letter_queue_reconcile(actor=self.actor)
            except Exception:
                # The database or the broker may be restarting: try again next tick.
                logger.exception("scheduler tick failed")
            finally:
                # Hold no connection between ticks: this thread lives in the worker's
                # main process, which forks pool children, and a child must not
                # inherit a live connection that belongs to this thread.
                connection.close()
