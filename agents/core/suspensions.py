"""Suspend and resume: approvals, events, durable timers, deadlines and cancellation.

A suspended task holds no worker and no broker message: its wait is a ``Suspension``
row, and whatever ends the wait (a decision, a signal, the scheduler's clock) resumes
it by publishing its next step inside the transaction that records the ending (a
refused publish rolls the ending back: ``Backpressure``). Times are the database's
(``agents.core.clock``).

Every operation here locks the task row first and checks the task's state under the
lock, so two operations racing on one task (approve and cancel, two approvals, a
signal during a resume) resolve to exactly one winner; the loser gets ``Conflict``.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import structlog
from django.contrib.auth.models import User
from django.db import connection, transaction

from agents import approvals, permissions
from agents.core import clock
from agents.core.dispatch import current_step_publish
from agents.core.state_machine import FINAL, TRANSITION_FIELDS, transition, transition_unlocked
from agents.definition import Resumption, Suspend
from agents.models import ACTIVE_STATUSES, AgentTask, Signal, Suspension, TaskStatus
from agents.selectors import parse_task_id
from agents_project.errors import Conflict, InvalidInput, NotFound
from agents_project.validation import json_value_check
from audit.models import AuditEvent, EventType
from audit.services import AuditBatch, events_insert_sql, events_json, user_actor

logger = structlog.get_logger(__name__)

R = Suspension.Resolution
_SAVE_FIELDS = ("audit_seq", "error", "retry_at", "in_flight", *TRANSITION_FIELDS)


def task_lock(*, task_id: UUID | str, user: User | None = None) -> AgentTask:
    """Lock and return the task for ``user`` to operate (``None``: the system, all).

    ``agents.permissions``: a task ``user`` may not see is ``NotFound`` (its existence
    is not disclosed); one they may see but not operate is ``Forbidden``.
    """
    tasks = permissions.tasks_visible_to(user, tasks=AgentTask.objects.select_for_update())
    task = tasks.filter(pk=parse_task_id(task_id)).first()
    if task is None:
        raise NotFound(f"no task {task_id}")
    permissions.task_change_check(user, task)
    return task


def task_begin(
    *,
    task_id: UUID,
    actor: str,
    head: tuple[int, str] | None = None,
    task: AgentTask | None = None,
) -> tuple[bool, tuple[int, str] | None]:
    """``pending`` -> ``running`` as its first step starts. Returns (whether the task may
    run, the audit chain's head ``(seq, hash)`` after it, None when unknown). ``head``
    and ``task``: the chain's head and the row as the caller's claim read them; with
    both, on PostgreSQL, the change is one statement that applies only if neither moved
    since (else the row is locked and read again, as without them)."""
    if task is not None and head is not None and connection.vendor == "postgresql":
        began = _begin_unless_moved(task, actor, head)
        if began is not None:
            return True, began
    with transaction.atomic():
        task = task_lock(task_id=task_id)
        if task.status != TaskStatus.PENDING:
            return task.status == TaskStatus.RUNNING, None
        audit = AuditBatch(task, actor=actor, head=head)
        transition(task, TaskStatus.RUNNING, audit=audit)
        events = audit.seal()
        AuditEvent.objects.bulk_create(events)
        task.save(update_fields=_SAVE_FIELDS)
    return True, ((events[-1].seq, events[-1].hash) if events else None)


# The task goes from ``pending`` to running and its transition event is appended, if its
# row still has the status and audit sequence the claim read: one statement, no lock held
# across round trips, and nothing written when it matches nothing.
_BEGIN_SQL = f"""
WITH began AS (
    UPDATE {AgentTask._meta.db_table}
       SET status = %(status)s, status_changed_at = %(now)s, updated_at = %(now)s,
           audit_seq = %(audit_seq)s
     WHERE id = %(id)s AND status = %(was)s AND audit_seq = %(seq)s
 RETURNING id
), events AS ({events_insert_sql("began")}
)
SELECT count(*) FROM began
"""


def _begin_unless_moved(
    task: AgentTask, actor: str, head: tuple[int, str]
) -> tuple[int, str] | None:
    """``task_begin`` as one statement (``_BEGIN_SQL``): the new chain head, or None
    when the row moved since the claim read it (not pending, or events appended)."""
    if task.status != TaskStatus.PENDING:
        return None
    moved = copy.copy(task)  # the caller's copy stays as it read it
    moved.audit_seq = head[0]  # (a claim's row carries it in the head)
    audit = AuditBatch(moved, actor=actor, head=head)
    transition_unlocked(moved, TaskStatus.RUNNING, audit=audit)
    events = audit.seal(explicit_transaction=True)
    with connection.cursor() as cursor:
        cursor.execute(
            _BEGIN_SQL,
            {
                "id": task.pk,
                "status": moved.status,
                "was": TaskStatus.PENDING,
                "seq": head[0],
                "audit_seq": moved.audit_seq,
                "now": moved.status_changed_at,
                "created": events[0].created_at,
                "events": events_json(events),
            },
        )
        row = cursor.fetchone()
    if not row or not row[0]:
        return None
    return events[-1].seq, events[-1].hash


def suspension_open(*, task: AgentTask, step: int, outcome: Suspend, audit: AuditBatch) -> bool:
    """Record the wait ``outcome`` asks for, in the step's commit (task row locked).

    Returns True if the wait is already over (a signal for it arrived earlier): then the
    task stays ``running`` and the caller publishes the next step.
    """
    now = clock.now()
    if outcome.approval is not None:
        kind = Suspension.Kind.APPROVAL
    elif outcome.event is not None:
        kind = Suspension.Kind.EVENT
    else:
        kind = Suspension.Kind.TIMER
    if kind == Suspension.Kind.TIMER:
        wake_at: datetime | None = outcome.until
    else:
        wake_at = now + timedelta(seconds=outcome.timeout) if outcome.timeout else None
    suspension = Suspension.objects.create(
        task=task,
        step=step,
        kind=kind,
        reason=outcome.approval or "",
        event_name=outcome.event or "",
        wake_at=wake_at,
        on_timeout=outcome.on_timeout,
        on_reject=outcome.on_reject,
        timeout_default=outcome.default,
        tool_name=outcome.tool_call.name if outcome.tool_call else "",
        tool_args=dict(outcome.tool_call.args) if outcome.tool_call else None,
    )
    audit.add(
        EventType.SUSPENDED,
        {
            "kind": kind,
            "reason": suspension.reason,
            "event": suspension.event_name,
            "wake_at": wake_at.isoformat() if wake_at else None,
            "on_timeout": outcome.on_timeout,
            **(
                {"tool": suspension.tool_name, "args": suspension.tool_args}
                if suspension.tool_name
                else {}
            ),
        },
        step=step,
    )
    if kind == Suspension.Kind.EVENT:
        early = (
            Signal.objects.filter(task=task, name=outcome.event, consumed_at__isnull=True)
            .order_by("created_at", "id")
            .first()
        )
        if early is not None:
            _signal_consume(early, suspension, audit, step=step)
            return True
    transition(task, TaskStatus.SUSPENDED, audit=audit, reason=kind)
    return False


_RESUMED_BY: dict[str, str] = {
    R.APPROVED: "approval",
    R.EDITED: "approval",
    R.RESPONDED: "approval",
    R.REJECTED: "approval",
    R.SIGNALLED: "event",
    R.WOKEN: "timer",
    R.TIMED_OUT: "timeout",
    R.JOINED: "children",
}
_APPROVED: dict[str, bool] = {
    R.APPROVED: True,
    R.EDITED: True,
    R.RESPONDED: False,
    R.REJECTED: False,
}
_DECISION: dict[str, str] = {
    R.APPROVED: "approve",
    R.EDITED: "edit",
    R.RESPONDED: "respond",
    R.REJECTED: "reject",
}
_RESOLUTION: dict[str, str] = {v: k for k, v in _DECISION.items()}


def resumption_for(*, task_id: UUID, step: int) -> Resumption | None:
    """What the step after a suspension sees of how the wait at ``step`` ended."""
    suspension = Suspension.objects.filter(task_id=task_id, step=step).first()
    if suspension is None or suspension.resolved_at is None:
        return None
    decided = suspension.payload if suspension.kind == Suspension.Kind.APPROVAL else None
    decided = decided if isinstance(decided, dict) else {}
    return Resumption(
        kind=_RESUMED_BY.get(suspension.resolution, suspension.resolution),
        approved=_APPROVED.get(suspension.resolution),
        payload=suspension.payload,
        comment=suspension.comment,
        decided_by=suspension.decided_by.get_username() if suspension.decided_by else "",
        decision=_DECISION.get(suspension.resolution, ""),
        args=decided.get("args"),
        message=decided.get("message") or "",
    )


def task_approve(
    *,
    task_id: UUID | str,
    user: User | None,
    approved: bool | None = None,
    comment: str = "",
    decision: str | None = None,
    args: Any = None,
    message: Any = None,
    actor: str | None = None,
) -> AgentTask:
    """Decide the approval a suspended task waits for.

    ``decision`` (or the older ``approved``: True approve, False reject): ``approve``
    resumes it, the decision visible to its next step; ``edit`` resumes it with the
    tool call's arguments replaced by ``args`` (checked against the tool's schema);
    ``respond`` resumes it with ``message`` as the call's result, the tool not run;
    ``reject`` ends it ``failed``, unless the agent asked to handle rejection itself
    (``on_reject``). The ``approval_decided`` event records the decision, who made it,
    and for an edit the original arguments, the new ones and their JSON Patch.
    ``InvalidInput`` names a bad field (``agents.approvals.decision_check``);
    ``Conflict`` if the task is not waiting for an approval (already decided,
    cancelled...); ``Forbidden`` if the agent's approval rules exclude ``user``.
    """
    actor = actor or user_actor(user)
    if not isinstance(comment, str):
        raise InvalidInput("must be a string", field="comment")
    with transaction.atomic():
        task = task_lock(task_id=task_id, user=user)
        suspension = _open_suspension(task, Suspension.Kind.APPROVAL)
        approvals.approval_check(user=user, task=task)
        chosen = approvals.decision_check(
            decision=decision,
            approved=approved,
            args=args,
            message=message,
            tool_name=suspension.tool_name,
            tool_args=suspension.tool_args,
        )
        audit = AuditBatch(task, actor=actor)
        decided: dict[str, Any] = {
            "approved": chosen.approved,
            "decision": chosen.decision,
            "comment": comment,
            "question": suspension.reason,
            "decided_by": user.get_username() if user is not None and user.pk else actor,
        }
        if suspension.tool_name:
            decided.update(tool=suspension.tool_name, original_args=suspension.tool_args)
        if chosen.decision == "edit":
            decided.update(args=chosen.args, diff=chosen.diff)
        if chosen.decision == "respond":
            decided.update(message=chosen.message)
        audit.add(EventType.APPROVAL_DECIDED, decided, step=suspension.step)
        suspension.decided_by = user if user is not None and user.pk else None
        suspension.comment = comment
        if chosen.decision in ("edit", "respond"):
            suspension.payload = {"args": chosen.args, "message": chosen.message}
        if chosen.decision != "reject" or suspension.on_reject == "continue":
            _resume(task, suspension, _RESOLUTION[chosen.decision], audit)
        else:
            suspension_resolve(suspension, R.REJECTED)
            task.error = f"approval rejected: {comment}" if comment else "approval rejected"
            transition(task, TaskStatus.FAILED, audit=audit, reason="approval rejected")
        audit.flush()
        task.save(update_fields=_SAVE_FIELDS)
    return task


def task_signal(
    *,
    task_id: UUID | str,
    user: User | None,
    name: str,
    payload: Any = None,
    actor: str | None = None,
) -> Signal:
    """Send the event ``name`` to a task.

    If the task waits for it, the wait ends and the task resumes with ``payload``; if
    not (yet), the signal is kept and the first later wait for ``name`` consumes it.
    Each signal is consumed exactly once. ``Conflict`` if the task has ended.
    """
    if not isinstance(name, str) or not name or len(name) > 200:
        raise InvalidInput("must be a non-empty string of at most 200 characters", field="name")
    json_value_check(payload, field="payload")
    actor = actor or user_actor(user)
    with transaction.atomic():
        task = task_lock(task_id=task_id, user=user)
        if task.status in FINAL:
            raise Conflict(f"task {task.pk} is {task.status}; it takes no more signals")
        signal = Signal.objects.create(
            task=task, name=name, payload=payload, sent_by=user if user and user.pk else None
        )
        audit = AuditBatch(task, actor=actor)
        audit.add(
            EventType.SIGNAL_RECEIVED,
            {"signal": signal.pk, "name": name, "payload": payload},
            step=task.current_step,
        )
        suspension = _open_suspension_or_none(task)
        if (
            suspension is not None
            and suspension.kind == Suspension.Kind.EVENT
            and suspension.event_name == name
        ):
            _signal_consume(signal, suspension, audit, step=suspension.step)
            transition(task, TaskStatus.RUNNING, audit=audit, reason=R.SIGNALLED)
            current_step_publish(task=task)
        audit.flush()
        task.save(update_fields=_SAVE_FIELDS)
    return signal


def task_cancel(*, task_id: UUID | str, user: User | None, actor: str | None = None) -> AgentTask:
    """Cancel a task that has not ended. No further step starts; a step already running
    finishes its work, records its checkpoint, and stops there."""
    actor = actor or user_actor(user)
    with transaction.atomic():
        task = task_lock(task_id=task_id, user=user)
        if task.status in FINAL:
            raise Conflict(f"task {task.pk} is {task.status}; it cannot be cancelled")
        task_cancel_locked(task=task, actor=actor, reason=f"cancelled by {actor}")
    return task


def task_cancel_locked(*, task: AgentTask, actor: str, reason: str) -> None:
    """Cancel ``task``, locked by the caller's transaction and not final: end its wait,
    drop a pending retry, transition, audit, save."""
    audit = AuditBatch(task, actor=actor)
    suspension = _open_suspension_or_none(task)
    if suspension is not None:
        suspension_resolve(suspension, R.CANCELLED)
    task.retry_at = None
    transition(task, TaskStatus.CANCELLED, audit=audit, reason=reason)
    audit.flush()
    task.save(update_fields=_SAVE_FIELDS)


def task_time_out(*, task_id: UUID, actor: str) -> bool:
    """End the task ``timed_out`` if its deadline has passed, wherever it is."""
    with transaction.atomic():
        task = task_lock(task_id=task_id)
        if (
            task.status not in ACTIVE_STATUSES
            or task.deadline is None
            or task.deadline > clock.now()
        ):
            return False
        audit = AuditBatch(task, actor=actor)
        suspension = _open_suspension_or_none(task)
        if suspension is not None:
            suspension_resolve(suspension, R.TIMED_OUT)
        task.retry_at = None
        task.error = f"deadline {task.deadline.isoformat()} passed"
        transition(task, TaskStatus.TIMED_OUT, audit=audit, reason="deadline")
        audit.flush()
        task.save(update_fields=_SAVE_FIELDS)
    logger.info("task timed out", task_id=str(task_id))
    return True


def suspension_expire(*, suspension_id: int, actor: str) -> bool:
    """The scheduler's clock reached a suspension's ``wake_at``: wake a timer, or apply a
    wait's ``on_timeout`` policy. False if something else ended the wait first."""
    suspension = Suspension.objects.filter(pk=suspension_id).only("task_id").first()
    if suspension is None:
        return False
    with transaction.atomic():
        task = task_lock(task_id=suspension.task_id)
        suspension = Suspension.objects.get(pk=suspension_id)
        if (
            task.status != TaskStatus.SUSPENDED
            or suspension.resolved_at is not None
            or suspension.step != task.current_step - 1
        ):
            return False
        audit = AuditBatch(task, actor=actor)
        if suspension.kind == Suspension.Kind.TIMER:
            _resume(task, suspension, R.WOKEN, audit)
        else:
            audit.add(
                EventType.WAIT_ENDED,
                {"kind": suspension.kind, "timed_out": True, "policy": suspension.on_timeout},
                step=suspension.step,
            )
            _apply_timeout_policy(task, suspension, audit)
        audit.flush()
        task.save(update_fields=_SAVE_FIELDS)
    return True


def _apply_timeout_policy(task: AgentTask, suspension: Suspension, audit: AuditBatch) -> None:
    policy = suspension.on_timeout
    if policy == "continue":
        suspension.payload = suspension.timeout_default
        _resume(task, suspension, R.TIMED_OUT, audit)
    elif (
        policy == "reject"
        and suspension.kind == Suspension.Kind.APPROVAL
        and suspension.on_reject == "continue"
    ):
        suspension.comment = "no decision before the wait's timeout"
        _resume(task, suspension, R.REJECTED, audit)
    else:
        suspension_resolve(suspension, R.TIMED_OUT)
        task.error = f"{suspension.kind} wait timed out"
        transition(task, TaskStatus.FAILED, audit=audit, reason=task.error)


def _open_suspension_or_none(task: AgentTask) -> Suspension | None:
    if task.status != TaskStatus.SUSPENDED:
        return None
    return Suspension.objects.filter(
        task=task, step=task.current_step - 1, resolved_at__isnull=True
    ).first()


def _open_suspension(task: AgentTask, kind: str) -> Suspension:
    suspension = _open_suspension_or_none(task)
    if suspension is None or suspension.kind != kind:
        raise Conflict(f"task {task.pk} is {task.status} and not waiting for an {kind}")
    return suspension


def suspension_resolve(suspension: Suspension, resolution: str) -> None:
    """Mark ``suspension`` ended now with ``resolution`` (saved)."""
    suspension.resolved_at = clock.now()
    suspension.resolution = resolution
    suspension.save()


def _resume(task: AgentTask, suspension: Suspension, resolution: str, audit: AuditBatch) -> None:
    suspension_resolve(suspension, resolution)
    transition(task, TaskStatus.RUNNING, audit=audit, reason=resolution)
    current_step_publish(task=task)


def _signal_consume(
    signal: Signal, suspension: Suspension, audit: AuditBatch, *, step: int
) -> None:
    now = clock.now()
    signal.consumed_at = now
    signal.consumed_at_step = step
    signal.save(update_fields=("consumed_at", "consumed_at_step"))
    suspension.payload = signal.payload
    suspension_resolve(suspension, R.SIGNALLED)
    audit.add(
        EventType.SIGNAL_CONSUMED,
        {"signal": signal.pk, "name": signal.name, "payload": signal.payload},
        step=step,
    )
