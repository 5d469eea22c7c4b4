"""The task state machine: one table, and the only code that writes ``AgentTask.status``.

=============  ==========================================================
from           allowed next statuses
=============  ==========================================================
pending        running, cancelled, timed_out, failed, dead_lettered
running        suspended, completed, failed, timed_out, cancelled,
               dead_lettered
suspended      running (recorded as ``resumed``), failed, timed_out,
               cancelled
dead_lettered  running (requeued by an operator), cancelled
completed      (final)
failed         (final)
timed_out      (final)
cancelled      (final)
=============  ==========================================================

Every transition is written as a ``transition`` audit event in the caller's
transaction, with the task row locked; an illegal one raises ``IllegalTransition``. A
transition into a finishing status is counted (``agents_tasks_finished_total``) once
that transaction commits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from django.db import transaction

from agents import metrics
from agents.core import clock
from agents.models import AgentTask, TaskStatus
from agents_project.errors import IllegalTransition
from audit.models import EventType
from audit.services import AuditBatch

S = TaskStatus

TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    S.PENDING: frozenset({S.RUNNING, S.CANCELLED, S.TIMED_OUT, S.FAILED, S.DEAD_LETTERED}),
    S.RUNNING: frozenset(
        {S.SUSPENDED, S.COMPLETED, S.FAILED, S.TIMED_OUT, S.CANCELLED, S.DEAD_LETTERED}
    ),
    S.SUSPENDED: frozenset({S.RUNNING, S.FAILED, S.TIMED_OUT, S.CANCELLED}),
    S.DEAD_LETTERED: frozenset({S.RUNNING, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.TIMED_OUT: frozenset(),
    S.CANCELLED: frozenset(),
}

FINAL: Final = frozenset(status for status, nexts in TRANSITIONS.items() if not nexts)
# Where a step may be executing or queued to execute.
RUNNABLE: Final = frozenset({S.PENDING, S.RUNNING})


# Called by ``transition`` after a task enters a final status, in its transaction (the
# task's row locked, its new status set but not saved): ``hook(task, audit)``. Child
# tasks (``agents.core.children``, a layer above) register the check of a parent's join
# here, so that it runs on every path that ends a task, in the same transaction.
FinalHook = Callable[[AgentTask, AuditBatch], None]
_final_hooks: list[FinalHook] = []


def final_hook_register(hook: FinalHook) -> None:
    """Run ``hook`` on every transition into a final status (see ``_final_hooks``)."""
    if hook not in _final_hooks:
        _final_hooks.append(hook)


def can_transition(current: str, to: str) -> bool:
    return to in TRANSITIONS[current]


def transition(task: AgentTask, to: TaskStatus, *, audit: AuditBatch, reason: str = "") -> None:
    """Move ``task`` to ``to`` and record it; the caller saves ``task`` and flushes ``audit``.

    The caller must hold the task's row lock inside ``transaction.atomic``.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("a transition needs the task row locked in a transaction")
    transition_unlocked(task, to, audit=audit, reason=reason)


def transition_unlocked(
    task: AgentTask, to: TaskStatus, *, audit: AuditBatch, reason: str = ""
) -> None:
    """``transition`` for a caller that holds no row lock: it writes the change with one
    statement that applies only while the row still has ``task.status`` and
    ``task.audit_seq`` as read (a compare-and-set in place of the lock), and on a miss
    drops ``task``, which this has changed, and the sealed events."""
    current = task.status
    if not can_transition(current, to):
        raise IllegalTransition(
            f"task {task.pk} is {current}; it cannot become {to}",
            status=current,
        )
    payload: dict[str, object] = {"from": current, "to": str(to)}
    if current == S.SUSPENDED and to == S.RUNNING:
        payload["resumed"] = True
    if reason:
        payload["reason"] = reason
    audit.add(EventType.TRANSITION, payload, step=task.current_step)
    # The database's clock, like the deadlines and timers these times are compared with.
    now = clock.now()
    task.status = to
    task.status_changed_at = now
    task.updated_at = now
    if to in FINAL:
        task.finished_at = now
    if to in metrics.FINISHED:
        agent, status = task.agent_name, str(to)
        transaction.on_commit(lambda: metrics.task_finished(agent=agent, status=status))
    if to in FINAL:
        for hook in _final_hooks:
            hook(task, audit)


# The fields a transition changes, for ``save(update_fields=...)``.
TRANSITION_FIELDS: Final = ("status", "status_changed_at", "updated_at", "finished_at")
