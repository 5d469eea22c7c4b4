"""Creating tasks: the rows a new task starts with, and many of them in one go.

Shared by ``agents.services`` (``task_start``, ``tasks_start``) and the child tasks a
step starts (``agents.core.children``), so that a task is born the same way whoever
starts it: its row, checkpoint 0 and its ``created`` event, with step 1 published
inside the creating transaction while it holds the task's creation lock
(``agents.core.leases.task_creation_lock``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.contrib.auth.models import User

from agents.core.dispatch import step_publish, step_time_limits
from agents.core.leases import task_creation_locks
from agents.definition import Agent
from agents.models import AgentTask, Checkpoint
from agents_project import tracing
from audit.models import AuditEvent, EventType
from audit.services import AuditBatch


def task_row(
    owner: User | None,
    definition: Agent,
    version: str,
    input: Any,
    deadline: datetime | None,
    *,
    queued: bool = False,
    owner_id: int | None = None,
) -> AgentTask:
    """A new task's row, unsaved: its first step's message counted in ``in_flight``,
    unless it waits for admission. ``owner_id`` instead of ``owner`` when only the id
    is at hand."""
    task = AgentTask(
        agent_name=definition.name,
        agent_version=version,
        input=input,
        state_version=definition.state_version,
        deadline=deadline,
        in_flight=0 if queued else 1,
        queued_for_admission=queued,
        # The task's trace: the current span's (a request's, a spawning step's), if any.
        trace_context=tracing.current_traceparent(),
    )
    if owner is not None:
        task.owner = owner
    else:
        assert owner_id is not None
        task.owner_id = owner_id
    return task


def first_checkpoint(task: AgentTask, definition: Agent, *, local: bool) -> Checkpoint:
    """Checkpoint 0, unsaved: the initial state, or none yet when the task's version is
    not this process's (its worker computes it, ``agents.core.versions``)."""
    return Checkpoint(
        task=task,
        step=0,
        state=definition.initial_state(task.input) if local else {},
        schema_version=definition.state_version if local else 0,
    )


def input_digest(value: Any) -> str:
    """The SHA-256 (hex) of a task's input as canonical JSON (sorted keys, no spaces):
    what its ``created`` event records of it."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def created_audit(task: AgentTask, definition: Agent, *, actor: str) -> AuditBatch:
    """The new task's audit batch holding its ``created`` event (the first of its chain);
    a child's names its parent, a scheduled one its schedule and slot."""
    audit = AuditBatch(task, actor=actor, head=(0, ""))
    payload: dict[str, Any] = {
        "agent": definition.name,
        "version": task.agent_version,
        # The input's digest, not the input: the input is the task row's, and a copy in
        # the trail was a twelfth of the room a finished task takes (issue 24); the
        # chained digest still shows the input as it was accepted.
        "input_sha256": input_digest(task.input),
        "deadline": task.deadline.isoformat() if task.deadline else None,
        "idempotency_key": task.idempotency_key,
    }
    if task.parent_id is not None:
        payload["parent"] = str(task.parent_id)
        payload["spawn_step"] = task.spawn_step
        payload["spawn_index"] = task.spawn_index
    if task.schedule_id is not None and task.schedule_slot is not None:
        payload["schedule"] = str(task.schedule_id)
        payload["slot"] = task.schedule_slot.isoformat()
    audit.add(EventType.CREATED, payload, step=0)
    return audit


def tasks_insert(*, tasks: Sequence[AgentTask], definitions: Sequence[Agent], actor: str) -> None:
    """Insert ``tasks`` (unsaved rows from ``task_row``, ids set, ``definitions[i]`` the
    agent of ``tasks[i]``), their checkpoints 0 and ``created`` events, one statement
    each, and publish step 1 of each one not waiting for admission. Call inside a
    transaction (its creation locks hold until it commits). A task whose version is
    not this process's gets its initial state from its own worker (``first_checkpoint``).
    ``Backpressure`` if the broker refuses a message: the transaction must roll back."""
    # Sealed first (each chain starts at (0, "")), so the rows go in with ``audit_seq``
    # already past their ``created`` event.
    events: list[AuditEvent] = []
    for task, definition in zip(tasks, definitions, strict=True):
        sealed = created_audit(task, definition, actor=actor).seal()
        # The chain head on the row (agents.0016), so step 1's claim reads no partition.
        task.audit_head_seq, task.audit_head_hash = sealed[-1].seq, sealed[-1].hash
        events += sealed
    AgentTask.objects.bulk_create(tasks)
    task_creation_locks(task_ids=[task.pk for task in tasks])
    Checkpoint.objects.bulk_create(
        first_checkpoint(task, definition, local=task.agent_version == definition.version)
        for task, definition in zip(tasks, definitions, strict=True)
    )
    AuditEvent.objects.bulk_create(events)
    limits: dict[str, tuple[float, float]] = {}
    for task, definition in zip(tasks, definitions, strict=True):
        if task.queued_for_admission:
            continue
        if definition.name not in limits:
            limits[definition.name] = step_time_limits(definition)
        step_publish(task_id=task.pk, step=1, agent=definition, limits=limits[definition.name])
