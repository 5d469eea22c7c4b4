"""The zero-setup demo: a real worker process, an embedded broker, a SQLite file.

It starts one Celery worker, runs a multi-step ``scripted`` agent (reasoning, a
calculation, a manager's approval that the demo grants, a side effect recorded once,
an answer), follows it live, and prints its audit timeline. Interrupt it at any point
and run it again: it finds the unfinished task and resumes it from its last checkpoint.

Its output is the story of the task only: the demo process's own log lines go to
``var/demo.log`` (the worker's to ``var/demo-worker.log``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from django.conf import settings
from django.core.management import call_command

from agents.models import ACTIVE_STATUSES, AgentTask, TaskStatus
from agents.scheduler import stuck_tasks_republish
from agents.scheduling import task_approve
from agents.services import service_user, task_start
from agents.state_machine import FINAL
from agents_project.worker_process import start_worker, stop_worker
from audit.selectors import audit_events
from audit.services import process_actor
from audit.timeline import describe, render
from tools.models import LedgerEntry

SCRIPT = [
    {"think": "Customer 42 returns 3 items bought at 19.99 each, with 8% sales tax."},
    {"tool": "calc", "args": {"expression": "3 * 19.99 * 1.08"}},
    {"think": "That is 64.77 after rounding; refunds above 50 need a manager's approval."},
    {"approval": "Refund 64.77 to customer 42?"},
    {"sleep": 1.0},
    {"tool": "ledger.append", "args": {"key": "refund:customer-42", "value": 64.77}},
    {"think": "The refund is recorded once, whatever happens to the worker."},
    {"final": "Refunded 64.77 to customer 42."},
]
TIME_LIMIT = 60.0

Out = Callable[[str], None]


def demo_run(*, out: Out) -> AgentTask:
    """Run (or resume) the demo task to its end, narrating it through ``out``.

    ``KeyboardInterrupt`` propagates once the worker is stopped; the task is left where
    it was, and the next run resumes it.
    """
    with _logs_to(settings.VAR_DIR / "demo.log"):
        return _run(out)


@contextlib.contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """Send this process's log records to ``path`` instead of the terminal."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.FileHandler(path)
    if saved and saved[0].formatter is not None:
        handler.setFormatter(saved[0].formatter)
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()


def _run(out: Out) -> AgentTask:
    call_command("migrate", verbosity=0)
    owner = service_user("demo")
    manager = service_user("manager")
    if not manager.is_staff:
        manager.is_staff = True
        manager.save(update_fields=["is_staff"])
    log_path = settings.VAR_DIR / "demo-worker.log"
    out(f"Database {settings.DATABASES['default']['NAME']}, broker {settings.CELERY_BROKER_URL}")
    own_log = log_path.parent / "demo.log"
    out(f"Starting a worker process (its log: {log_path}; the demo's own: {own_log})")
    with open(log_path, "ab") as log:
        # If the demo is killed, its worker dies too (SIGKILL: a crash, not a clean stop),
        # so the next run finds the task unfinished and resumes it.
        worker = start_worker(
            env={"AGENTS_SCHEDULER_INTERVAL": "0.5"},
            concurrency=1,
            hostname="demo@%h",
            output=log,
            parent_death_signal=signal.SIGKILL,
        )
        try:
            task = _unfinished(owner)
            if task is not None:
                out(f"Resuming task {task.pk}, left {task.status} at step {task.current_step}")
                stuck_tasks_republish(actor=process_actor("demo"), stuck_after=0)
            else:
                task, _ = task_start(owner=owner, agent="scripted", input={"script": SCRIPT})
                out(f"Started task {task.pk}")
            task = _follow(task, manager, out)
        finally:
            stop_worker(worker)
    _summary(task, out)
    return task


def _unfinished(owner) -> AgentTask | None:
    return (
        AgentTask.objects.filter(owner=owner, status__in=ACTIVE_STATUSES)
        .order_by("created_at")
        .first()
    )


def _follow(task: AgentTask, manager, out: Out) -> AgentTask:
    seen = task.audit_seq if task.status != TaskStatus.PENDING else 0
    deadline = time.monotonic() + TIME_LIMIT
    while time.monotonic() < deadline:
        task = AgentTask.objects.get(pk=task.pk)
        for event in audit_events(task=task, after_seq=seen):
            out(f"  step {event.step}: {event.type}: {describe(event)}")
            seen = event.seq
        if task.status in FINAL or task.status == TaskStatus.DEAD_LETTERED:
            return task
        if task.status == TaskStatus.SUSPENDED:
            out("  (the demo plays the manager and approves)")
            task_approve(
                task_id=task.pk, user=manager, approved=True, comment="ok, receipt checked"
            )
        time.sleep(0.1)
    out(f"The task did not finish within {TIME_LIMIT:g} s; see the worker log.")
    return task


def _summary(task: AgentTask, out: Out) -> None:
    ledger = LedgerEntry.objects.filter(task=task).count()
    out("")
    out(f"Task {task.pk}: {task.status}")
    out(f"Result: {task.result!r}")
    out(f"Ledger rows written by this task: {ledger} (one per idempotency key)")
    out(f"Checkpoints: {task.checkpoints.count()}")
    out("")
    out("Timeline (python manage.py audit <task id> prints it again):")
    out(render(audit_events(task=task)))
