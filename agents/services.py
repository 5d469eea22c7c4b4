"""Starting and replaying tasks. (Suspend, resume and cancel: ``agents.core.suspensions``;
retries and dead letters: ``agents.core.retries``; the step itself: ``agents.core.engine``.)"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from agents import metrics, permissions
from agents.core import clock
from agents.core.admission import admission_needed
from agents.core.dispatch import step_publish
from agents.core.intake import created_audit, first_checkpoint, task_row, tasks_insert
from agents.core.leases import task_creation_lock
from agents.core.versions import version_for_new_task
from agents.definition import Agent, get_agent
from agents.models import AgentTask, Checkpoint, Schedule, Suspension
from agents.selectors import parse_task_id
from agents.timeouts import learned_limit
from agents_project import tracing
from agents_project.errors import InvalidInput, NotFound
from agents_project.validation import json_value_check
from audit.models import EventType
from audit.services import AuditBatch, user_actor
from tools.registry import tool_owner

MAX_IDEMPOTENCY_KEY = 200


def task_start(
    *,
    owner: User,
    agent: Any,
    input: Any,
    idempotency_key: Any = None,
    timeout_seconds: Any = None,
    actor: str | None = None,
    schedule: Schedule | None = None,
    schedule_slot: datetime | None = None,
) -> tuple[AgentTask, bool]:
    """Accept a task and publish its first step. Returns ``(task, created)``.

    Every argument is checked before anything is written (``InvalidInput`` names the
    field). The task, its initial checkpoint and its ``created`` event are written in
    one transaction, and step 1 is published before it commits: if the broker refuses
    (``Backpressure``), nothing is left behind. A worker that receives step 1 before
    the commit waits for it on an advisory lock the transaction holds (keyed by the
    task id, ``agents.core.leases``), so no stall between publish and commit can make
    it drop the step. With an ``idempotency_key`` already
    used by this owner, the existing task is returned and nothing new is created.

    Fair sharing (``agents.core.admission``): when the owner is at
    ``AGENTS_OWNER_MAX_RUNNING`` or the agent's ``max_running_per_owner``, or already
    has tasks waiting, the task is created ``pending`` with ``queued_for_admission`` and
    no message; the scheduler admits it (and publishes step 1) when a place frees.

    ``schedule`` and ``schedule_slot``: the schedule firing that starts it
    (``agents.schedules``), recorded on the task and in its ``created`` event.
    """
    if not isinstance(agent, str) or not agent:
        raise InvalidInput("must be the name of an agent", field="agent")
    definition = get_agent(agent)
    json_value_check(input, field="input")
    with tool_owner(owner.pk):  # the tools this owner's tasks may name (its MCP servers)
        definition.validate_input(input)
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str)
        or not idempotency_key
        or len(idempotency_key) > MAX_IDEMPOTENCY_KEY
    ):
        raise InvalidInput(
            f"must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} characters",
            field="idempotency_key",
        )
    if timeout_seconds is None and (learned := learned_limit(definition)) is not None:
        timeout_seconds = learned.task_timeout
    deadline = _deadline(timeout_seconds)
    if idempotency_key is not None:
        existing = AgentTask.objects.filter(owner=owner, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing, False
    # The task's trace starts here (under the API request's span, if any): every step
    # joins it through ``trace_context`` (``agents_project.tracing``).
    with tracing.span(f"task_start {definition.name}", attributes=_task_attributes(definition)):
        try:
            # The version intake pins the task to (``agents.core.versions``): the newest one
            # live workers serve, or the AGENTS_VERSION_RAMP split. When it is not this
            # process's code, the task's own worker computes the initial state at step 1.
            version = version_for_new_task(agent=definition)
            local = version == definition.version
            with transaction.atomic():
                queued = admission_needed(owner_id=owner.pk, agent=definition)
                task = task_row(owner, definition, version, input, deadline, queued=queued)
                task.idempotency_key = idempotency_key
                task.schedule, task.schedule_slot = schedule, schedule_slot
                task.save(force_insert=True)
                tracing.attributes_set({"agents.task.id": str(task.pk)})
                task_creation_lock(task_id=task.pk)
                first_checkpoint(task, definition, local=local).save(force_insert=True)
                audit = created_audit(task, definition, actor=actor or user_actor(owner))
                audit.flush()
                # The chain head on the row (agents.0016): step 1's claim reads it there.
                task.audit_head_seq, task.audit_head_hash = audit.head or (None, "")
                task.save(update_fields=("audit_seq", "audit_head_seq", "audit_head_hash"))
                if not queued:
                    step_publish(task_id=task.pk, step=1, agent=definition)
                name = definition.name
                transaction.on_commit(lambda: metrics.task_created(agent=name))
        except IntegrityError:
            # Two requests with one idempotency key raced; the other one created it.
            existing = AgentTask.objects.filter(
                owner=owner, idempotency_key=idempotency_key
            ).first()
            if existing is None:
                raise
            return existing, False
        return task, True


def _task_attributes(definition: Agent) -> dict[str, str]:
    return {"gen_ai.agent.name": definition.name, "agents.agent.version": definition.version}


# Inputs ``tasks_start`` accepts at once.
MAX_BATCH = 1000


def tasks_start(
    *, owner: User, agent: Any, inputs: Any, actor: str | None = None
) -> list[AgentTask]:
    """Accept ``inputs`` (a list of 1 to ``MAX_BATCH``) as tasks of one agent and publish
    their first steps, all in one transaction: every task or none. Returns them in the
    order of ``inputs``.

    The same rules as ``task_start`` (each input checked before anything is written,
    ``InvalidInput`` naming ``inputs[i]...``; ``Backpressure`` if the broker refuses,
    leaving nothing), at a fraction of its cost per task: the tasks, checkpoints and
    ``created`` events are inserted with one statement each, and the version intake and
    the agent's learned deadline are read once. Tasks subject to fair sharing (an owner
    or agent limit is set) are started one by one with ``task_start``, which queues
    those past the limit for admission.
    """
    if not isinstance(agent, str) or not agent:
        raise InvalidInput("must be the name of an agent", field="agent")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_BATCH:
        raise InvalidInput(f"must be a list of 1 to {MAX_BATCH} inputs", field="inputs")
    definition = get_agent(agent)
    for index, input in enumerate(inputs):
        try:
            json_value_check(input, field="input")
            with tool_owner(owner.pk):
                definition.validate_input(input)
        except InvalidInput as exc:
            field = exc.field or "input"
            rest = field[len("input") :] if field.startswith("input") else f".{field}"
            raise InvalidInput(exc.message, field=f"inputs[{index}]{rest}") from None
    if settings.AGENTS["OWNER_MAX_RUNNING"] or definition.max_running_per_owner:
        with transaction.atomic():
            return [task_start(owner=owner, agent=agent, input=i, actor=actor)[0] for i in inputs]
    learned = learned_limit(definition)
    deadline = _deadline(learned.task_timeout if learned is not None else None)
    version = version_for_new_task(agent=definition)
    with transaction.atomic():
        tasks = [task_row(owner, definition, version, input, deadline) for input in inputs]
        tasks_insert(
            tasks=tasks,
            definitions=[definition] * len(tasks),
            actor=actor or user_actor(owner),
        )
        name, count = definition.name, len(tasks)

        def counted() -> None:
            for _ in range(count):
                metrics.task_created(agent=name)

        transaction.on_commit(counted)
    return tasks


def task_replay(
    *,
    task_id: UUID | str,
    user: User | None,
    from_step: Any = None,
    owner: User | None = None,
) -> AgentTask:
    """A new task that starts from a checkpoint of ``task_id``; the original is untouched.

    ``from_step`` (default: the latest checkpoint) names the checkpoint whose state the
    new task starts from; it runs step ``from_step + 1`` next. The new task is linked to
    the original and its audit trail says where it came from.
    """
    tasks = permissions.tasks_visible_to(user)
    original = tasks.filter(pk=parse_task_id(task_id)).first()
    if original is None:
        raise NotFound(f"no task {task_id}")
    permissions.task_change_check(user, original)
    checkpoints = Checkpoint.objects.filter(task=original)
    if from_step is None:
        checkpoint = checkpoints.order_by("-step").first()
    elif isinstance(from_step, bool) or not isinstance(from_step, int) or from_step < 0:
        raise InvalidInput("must be a checkpoint's step number (0 or more)", field="from_step")
    else:
        checkpoint = checkpoints.filter(step=from_step).first()
    if checkpoint is None:
        raise InvalidInput(f"task {original.pk} has no checkpoint {from_step}", field="from_step")
    definition = get_agent(original.agent_name)
    new_owner = owner or original.owner
    with transaction.atomic():
        queued = admission_needed(owner_id=new_owner.pk, agent=definition)
        task = AgentTask.objects.create(
            owner=new_owner,
            agent_name=original.agent_name,
            agent_version=version_for_new_task(agent=definition),
            input=original.input,
            state_version=checkpoint.schema_version,
            current_step=checkpoint.step + 1,
            replayed_from=original,
            replayed_from_step=checkpoint.step,
            in_flight=0 if queued else 1,
            queued_for_admission=queued,
            # The replay is a new trace's task (the request's, when traced).
            trace_context=tracing.current_traceparent(),
        )
        task_creation_lock(task_id=task.pk)
        Checkpoint.objects.create(
            task=task,
            step=checkpoint.step,
            state=checkpoint.state,
            observations=checkpoint.observations,
            schema_version=checkpoint.schema_version,
        )
        _joined_children_reuse(original, task, step=checkpoint.step)
        audit = AuditBatch(task, actor=user_actor(user))
        audit.add(
            EventType.REPLAYED_FROM,
            {"task": str(original.pk), "checkpoint": checkpoint.step},
            step=checkpoint.step,
        )
        audit.flush()
        task.save(update_fields=("audit_seq",))
        if not queued:
            step_publish(task_id=task.pk, step=task.current_step, agent=definition)
    return task


def _joined_children_reuse(original: AgentTask, replay: AgentTask, *, step: int) -> None:
    """A replay from the checkpoint of a step that started children whose join held
    reuses them: its next step sees the same children's outcomes (the wait's record is
    copied), and none is started again."""
    joined = Suspension.objects.filter(
        task=original,
        step=step,
        kind=Suspension.Kind.CHILDREN,
        resolution=Suspension.Resolution.JOINED,
    ).first()
    if joined is not None:
        joined.pk = None
        joined.task = replay
        joined.save(force_insert=True)


def service_user(username: str) -> User:
    """The account that owns tasks started from the command line (created on first use)."""
    user, created = get_user_model().objects.get_or_create(username=username)
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def _deadline(timeout_seconds: Any) -> Any:
    if timeout_seconds is None:
        return None
    if (
        isinstance(timeout_seconds, bool)
        or not isinstance(timeout_seconds, int | float)
        or not math.isfinite(timeout_seconds)
        or timeout_seconds <= 0
        or timeout_seconds > 366 * 86400
    ):
        raise InvalidInput("must be a number of seconds above 0", field="timeout_seconds")
    return clock.now() + timedelta(seconds=timeout_seconds)
