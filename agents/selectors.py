"""Reading tasks, as a given user may see them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from django.contrib.auth.models import User
from django.db.models import QuerySet

from agents import permissions
from agents.models import AgentTask, Checkpoint, Suspension, TaskStatus
from agents_project.errors import NotFound
from audit.models import DeadLetter


def parse_task_id(value: UUID | str) -> UUID:
    """A task id from user input; a malformed one is simply not found."""
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        raise NotFound(f"no task {value}") from None


def tasks_visible_to(user: User | None) -> QuerySet[AgentTask]:
    """The tasks ``user`` may read (``agents.permissions``): their own, or every task
    with the ``view_agenttask`` permission (and for the system, ``None``)."""
    return permissions.tasks_visible_to(user, tasks=AgentTask.objects.select_related("owner"))


def task_get(*, task_id: UUID | str, user: User | None) -> AgentTask:
    task = tasks_visible_to(user).filter(pk=parse_task_id(task_id)).first()
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


def task_list(
    *, user: User | None, status: str | None = None, agent: str | None = None
) -> QuerySet[AgentTask]:
    """Tasks ``user`` may see, newest first, optionally of one status and one agent."""
    tasks = tasks_visible_to(user).order_by("-created_at")
    if status:
        tasks = tasks.filter(status=status)
    if agent:
        tasks = tasks.filter(agent_name=agent)
    return tasks


def task_children(*, task: AgentTask) -> QuerySet[AgentTask]:
    """The child tasks ``task``'s steps started, in the order they were started (by
    step, then by place). Children have their parent's owner: whoever may see the
    parent may see them."""
    return (
        AgentTask.objects.select_related("owner")
        .filter(parent=task)
        .order_by("spawn_step", "spawn_index")
    )


def task_checkpoints(*, task: AgentTask, after_step: int | None = None) -> QuerySet[Checkpoint]:
    """The task's checkpoints in step order, from the one after ``after_step`` if given."""
    checkpoints = Checkpoint.objects.filter(task=task).order_by("step")
    if after_step is not None:
        checkpoints = checkpoints.filter(step__gt=after_step)
    return checkpoints


def task_open_suspension(*, task: AgentTask) -> Suspension | None:
    """What a suspended task waits for (an approval, an event, a time), if it does."""
    if task.status != TaskStatus.SUSPENDED:
        return None
    return Suspension.objects.filter(
        task=task, step=task.current_step - 1, resolved_at__isnull=True
    ).first()


def open_waits(*, kind: str | None = None) -> QuerySet[Suspension]:
    """Suspended tasks' waits still open, oldest first, with their task."""
    waits = Suspension.objects.filter(
        resolved_at__isnull=True, task__status=TaskStatus.SUSPENDED
    ).select_related("task", "task__owner")
    if kind:
        waits = waits.filter(kind=kind)
    return waits.order_by("created_at")


def dead_letters_visible_to(
    user: User | None, *, open: bool | None = None, task_id: UUID | None = None
) -> QuerySet[DeadLetter]:
    """Dead letters ``user`` may see (``agents.permissions``: those of their own tasks,
    or all with ``audit.view_deadletter``, and for the system), newest first.

    ``open``: True for letters not requeued yet (the partial index ``dead_letter_open``),
    False for requeued ones, None for both.
    """
    letters = DeadLetter.objects.select_related("task").order_by("-created_at", "-id")
    letters = permissions.dead_letters_visible_to(user, letters)
    if open is not None:
        letters = letters.filter(requeued_at__isnull=open)
    if task_id is not None:
        letters = letters.filter(task_id=task_id)
    return letters


def dead_letter_get(*, dead_letter_id: int | str, user: User | None) -> DeadLetter:
    """One dead letter ``user`` may see; a malformed id, like another user's, is NotFound."""
    try:
        pk = int(dead_letter_id)
    except (TypeError, ValueError):
        raise NotFound(f"no dead letter {dead_letter_id}") from None
    letter = None
    if 0 < pk < 2**63:
        letter = dead_letters_visible_to(user).filter(pk=pk).first()
    if letter is None:
        raise NotFound(f"no dead letter {dead_letter_id}")
    return letter


# What a task's model calls cost: ``GET /api/tasks/{id}/``'s ``usage``. The app that makes
# model calls (``llm``) registers its reader when it is ready; without one, zeros.
USAGE_KEYS = ("model_calls", "prompt_tokens", "completion_tokens", "total_tokens", "cost")
UsageReader = Callable[..., Mapping[str, Any]]
_usage_readers: list[UsageReader] = []


def task_usage_reader_register(reader: UsageReader) -> None:
    """Add ``reader(task_id=UUID) -> {USAGE_KEYS: number}`` to what ``task_usage`` sums
    (called from an ``AppConfig.ready``)."""
    if reader not in _usage_readers:
        _usage_readers.append(reader)


def task_usage_none() -> dict[str, Any]:
    """The usage of a task just created: zeros, read from nothing."""
    totals: dict[str, Any] = {key: 0 for key in USAGE_KEYS}
    totals["cost"] = 0.0
    return totals


def task_usage(*, task_id: UUID) -> dict[str, Any]:
    """``{model_calls, prompt_tokens, completion_tokens, total_tokens, cost}`` of the task,
    summed over the registered readers (ints, and cost a float)."""
    totals: dict[str, Any] = {key: 0 for key in USAGE_KEYS}
    totals["cost"] = 0.0
    for reader in _usage_readers:
        for key, value in reader(task_id=task_id).items():
            totals[key] += value
    return totals
