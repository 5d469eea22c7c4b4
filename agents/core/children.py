"""Child tasks: a step starts tasks and its task waits, holding no worker, for a join.

**Starting.** A step returns ``StartChildren`` (``agents.definition``). Its commit (the
general path of ``agents.core.commit``, the parent's row locked) calls
``children_spawn``: the children are inserted with ``agents.core.intake.tasks_insert``
(one statement each for the tasks, their checkpoints 0 and ``created`` events, and the
step-1 messages published before the commit), a ``Suspension`` of kind ``children``
records the join, and the parent becomes ``suspended``. A child's id is derived from
``(parent, step, index)`` (``child_id``) and ``(parent, spawn_step, spawn_index)`` is
unique, so a step that runs again after a crash starts no second copy: either its
first commit rolled back (and took the children, never seen by any worker, with it)
or it committed and the step is not current any more. Children are tasks of the
parent's owner, admitted like any task of that owner (``agents.core.admission``), with
the parent's deadline.

**Joining.** Every transition into a final status calls ``child_ended``
(``agents.core.state_machine.final_hook_register``) in the child's own transaction:
it locks the parent's row (child, then parent: nothing locks the other way round),
records ``child_ended`` on the parent, and counts the children of that step. When
``join_count`` of them have completed the wait ends ``joined``: its payload is the
children's outcomes in the order they were started, and the parent's next step is
published in that transaction. When so many ended without completing (failed,
cancelled, timed out) that the join cannot hold any more, the parent ends ``failed``
with that child's error. Both are idempotent: a parent that no longer waits on that
step is left alone.

**Cascade.** A task with children that ends (in any final status) cancels its live
children, and a join that holds cancels the children of that step still live; each in
its own transaction after the ending commits (``children_cancel``), never under the
parent's lock (a child ending locks child then parent: the other order could
deadlock). If that process dies first, the scheduler finds live children of ended
parents (``orphans_cancel``).
"""

from __future__ import annotations

import uuid
from typing import Any
from uuid import UUID

import structlog
from django.db import transaction
from django.db.models import Count, Q, QuerySet

from agents.core import clock
from agents.core.admission import admission_needed, limits_apply
from agents.core.dispatch import current_step_publish
from agents.core.intake import task_row, tasks_insert
from agents.core.state_machine import FINAL, TRANSITION_FIELDS, final_hook_register, transition
from agents.core.suspensions import suspension_resolve, task_cancel_locked, task_time_out
from agents.core.versions import version_for_new_task
from agents.definition import ChildSpec, StartChildren, get_agent
from agents.errors import PermanentError
from agents.models import AgentTask, Suspension, TaskStatus
from agents_project.errors import InvalidInput
from agents_project.validation import json_value_check
from audit.models import EventType
from audit.services import AuditBatch, process_actor

logger = structlog.get_logger(__name__)

# Children one step may start.
MAX_CHILDREN = 1000
# Statuses a child can still leave by itself or by an operator (a dead-lettered child
# may be requeued): the cascade cancels these.
LIVE = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.SUSPENDED, TaskStatus.DEAD_LETTERED)
_PARENT_FIELDS = ("audit_seq", "error", "in_flight", "spawned", *TRANSITION_FIELDS)


def child_id(*, parent_id: UUID, step: int, index: int) -> UUID:
    """The id of the ``index``-th child started by ``step`` of ``parent_id`` (UUID 5)."""
    return uuid.uuid5(parent_id, f"child:{step}:{index}")


def children_check(outcome: StartChildren) -> None:
    """Refuse, before the commit, children that could never start, with a
    ``PermanentError`` naming ``children[i]...`` (the step fails, nothing is written)."""
    if not 1 <= len(outcome.children) <= MAX_CHILDREN:
        raise PermanentError(f"children: must be 1 to {MAX_CHILDREN} children")
    if outcome.on_child_failure not in ("fail", "report"):
        raise PermanentError('on_child_failure: must be "fail" or "report"')
    join = outcome.join
    if join not in ("all", "any") and (
        isinstance(join, bool)
        or not isinstance(join, int)
        or not 1 <= join <= len(outcome.children)
    ):
        raise PermanentError(
            f'join: must be "all", "any" or a number from 1 to {len(outcome.children)}'
        )
    for index, spec in enumerate(outcome.children):
        try:
            if not isinstance(spec, ChildSpec):
                raise InvalidInput("must be a ChildSpec(agent, input)", field="")
            definition = get_agent(spec.agent)
            json_value_check(spec.input, field="input")
            definition.validate_input(spec.input)
        except InvalidInput as exc:
            raise PermanentError(f"children[{index}].{exc.field}: {exc.message}") from None


def children_spawn(
    *, parent: AgentTask, step: int, outcome: StartChildren, audit: AuditBatch
) -> None:
    """Start ``outcome``'s children and suspend ``parent`` on their join, in the commit of
    ``step`` (``parent`` locked and ``running``; the caller saves ``TRANSITION_FIELDS``
    and ``spawned``). ``Backpressure`` if the broker refuses: the commit rolls back."""
    definitions = [get_agent(spec.agent) for spec in outcome.children]
    versions: dict[str, str] = {}
    tasks = []
    for index, (spec, definition) in enumerate(zip(outcome.children, definitions, strict=True)):
        if definition.name not in versions:
            versions[definition.name] = version_for_new_task(agent=definition)
        task = task_row(
            None,
            definition,
            versions[definition.name],
            spec.input,
            parent.deadline,
            owner_id=parent.owner_id,
        )
        task.id = child_id(parent_id=parent.pk, step=step, index=index)
        task.parent_id = parent.pk
        task.spawn_step = step
        task.spawn_index = index
        tasks.append(task)
    actor = f"task:{parent.pk}"
    if any(limits_apply(definition) for definition in definitions):
        # Fair sharing: each child is checked against its owner's limits after the ones
        # before it are in (as ``tasks_start`` does), so none passes a limit.
        for task, definition in zip(tasks, definitions, strict=True):
            queued = admission_needed(owner_id=parent.owner_id, agent=definition)
            task.queued_for_admission, task.in_flight = queued, 0 if queued else 1
            tasks_insert(tasks=[task], definitions=[definition], actor=actor)
    else:
        tasks_insert(tasks=tasks, definitions=definitions, actor=actor)
    Suspension.objects.create(
        task=parent,
        step=step,
        kind=Suspension.Kind.CHILDREN,
        reason=str(outcome.join),
        join_count=outcome.join_count,
        children_count=len(tasks),
        on_child_failure=outcome.on_child_failure,
    )
    parent.spawned += len(tasks)
    audit.add(
        EventType.CHILDREN_STARTED,
        {
            "join": outcome.join,
            "children": [{"task": str(t.pk), "agent": t.agent_name} for t in tasks],
        },
        step=step,
    )
    audit.add(
        EventType.SUSPENDED, {"kind": Suspension.Kind.CHILDREN, "join": outcome.join}, step=step
    )
    transition(parent, TaskStatus.SUSPENDED, audit=audit, reason=Suspension.Kind.CHILDREN)


def child_ended(task: AgentTask, audit: AuditBatch) -> None:
    """The final-status hook (``final_hook_register``): cascade to ``task``'s children
    once its ending commits, and check its parent's join. ``task`` is locked, its final
    status set; runs in its transaction."""
    if task.spawned:
        parent_id = task.pk
        transaction.on_commit(
            lambda: _cancel_after_commit(parent_id=parent_id, reason="parent ended")
        )
    if task.parent_id is None or task.spawn_step is None:
        return
    parent = AgentTask.objects.select_for_update().get(pk=task.parent_id)
    suspension = Suspension.objects.filter(
        task=parent, step=task.spawn_step, kind=Suspension.Kind.CHILDREN, resolved_at__isnull=True
    ).first()
    if (
        suspension is None
        or parent.status != TaskStatus.SUSPENDED
        or suspension.step != parent.current_step - 1
    ):
        return  # the parent does not wait on this child (any more)
    if parent.deadline is not None and parent.deadline <= clock.now():
        # The child shares its parent's deadline: the parent times out (not "a child
        # failed"), whichever of the two the scheduler reached first.
        task_time_out(task_id=parent.pk, actor=audit.actor)
        return
    parent_audit = AuditBatch(parent, actor=audit.actor)
    parent_audit.add(
        EventType.CHILD_ENDED,
        {
            "task": str(task.pk),
            "agent": task.agent_name,
            "index": task.spawn_index,
            "status": task.status,
            "error": task.error or None,
        },
        step=suspension.step,
    )
    siblings = AgentTask.objects.filter(parent=parent, spawn_step=suspension.step).exclude(
        pk=task.pk
    )
    counts = siblings.aggregate(
        completed=Count("pk", filter=Q(status=TaskStatus.COMPLETED)),
        unsuccessful=Count("pk", filter=Q(status__in=FINAL - {TaskStatus.COMPLETED})),
    )
    completed = counts["completed"] + (task.status == TaskStatus.COMPLETED)
    unsuccessful = counts["unsuccessful"] + (task.status != TaskStatus.COMPLETED)
    join_count, count = suspension.join_count or 0, suspension.children_count or 0
    if suspension.on_child_failure == "report":
        completed, unsuccessful = completed + unsuccessful, 0
    if completed >= join_count:
        suspension.payload = _outcomes(parent, suspension.step, task)
        suspension_resolve(suspension, Suspension.Resolution.JOINED)
        transition(parent, TaskStatus.RUNNING, audit=parent_audit, reason="joined")
        current_step_publish(task=parent)
        if completed + unsuccessful < count:
            parent_id, step = parent.pk, suspension.step
            transaction.on_commit(
                lambda: _cancel_after_commit(parent_id=parent_id, step=step, reason="join held")
            )
    elif unsuccessful > count - join_count:
        suspension.payload = _outcomes(parent, suspension.step, task)
        suspension_resolve(suspension, Suspension.Resolution.CHILD_FAILED)
        parent.error = f"child {task.pk} ({task.agent_name}) ended {task.status}" + (
            f": {task.error}" if task.error else ""
        )
        transition(parent, TaskStatus.FAILED, audit=parent_audit, reason=parent.error)
    parent_audit.flush()
    parent.save(update_fields=_PARENT_FIELDS)


def _outcomes(parent: AgentTask, step: int, ending: AgentTask) -> list[dict[str, Any]]:
    """The children of ``step`` in the order they were started, with ``ending`` (not saved
    yet) as it is now: ``{"task", "agent", "status", "result", "error", "ended"}``."""
    rows: list[dict[str, Any]] = [
        dict(row)
        for row in AgentTask.objects.filter(parent=parent, spawn_step=step)
        .order_by("spawn_index")
        .values("id", "agent_name", "status", "result", "error", "finished_at", "spawn_index")
    ]
    for row in rows:
        if row["id"] == ending.pk:
            row.update(status=ending.status, result=ending.result, error=ending.error)
            row["finished_at"] = ending.finished_at
    ended = sorted(
        (r for r in rows if r["status"] in FINAL),
        key=lambda r: (r["finished_at"], r["spawn_index"]),
    )
    order = {r["id"]: n for n, r in enumerate(ended, start=1)}
    return [
        {
            "task": str(r["id"]),
            "agent": r["agent_name"],
            "status": r["status"],
            "result": r["result"],
            "error": r["error"] or None,
            "ended": order.get(r["id"]),
        }
        for r in rows
    ]


def children_cancel(*, parent_id: UUID, step: int | None = None, actor: str, reason: str) -> int:
    """Cancel the live children of ``parent_id`` (of its ``step`` only, when given), in
    one transaction, locked in id order. Returns how many. Safe to run twice."""
    with transaction.atomic():
        live = AgentTask.objects.select_for_update().filter(parent_id=parent_id, status__in=LIVE)
        if step is not None:
            live = live.filter(spawn_step=step)
        children = list(live.order_by("pk"))
        for child in children:
            task_cancel_locked(task=child, actor=actor, reason=reason)
    if children:
        logger.info("children cancelled", task_id=str(parent_id), count=len(children))
    return len(children)


def _cancel_after_commit(*, parent_id: UUID, reason: str, step: int | None = None) -> None:
    # After the commit that made it necessary. A failure here is left to the scheduler's
    # ``orphans_cancel`` (when the parent ended) rather than raised into that commit's
    # caller, which has already succeeded.
    try:
        children_cancel(
            parent_id=parent_id, step=step, actor=process_actor("children"), reason=reason
        )
    except Exception as exc:
        logger.warning("children not cancelled yet", task_id=str(parent_id), error=repr(exc))


def orphan_parents(limit: int = 50) -> QuerySet[AgentTask, UUID]:
    """Ids of ended parents that still have live children (at most ``limit``). Read on
    the partial index of live children (``agent_task_live_children``), which only a
    ``parent_id IS NOT NULL`` in the query lets PostgreSQL use: without it, every live
    or dead-lettered task was read (0.4 s at a million tasks, on every scheduler tick)."""
    return (
        AgentTask.objects.filter(status__in=LIVE, parent__isnull=False, parent__status__in=FINAL)
        .values_list("parent_id", flat=True)
        .distinct()[:limit]
    )


def orphans_cancel(*, actor: str, limit: int = 50) -> int:
    """Cancel live children of parents that have ended (a cascade whose process died
    after the parent's commit). Returns how many children were cancelled."""
    cancelled = 0
    for parent_id in list(orphan_parents(limit)):
        cancelled += children_cancel(parent_id=parent_id, actor=actor, reason="parent ended")
    return cancelled


final_hook_register(child_ended)
