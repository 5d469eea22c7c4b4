"""Reading tasks, as a given user may see them."""

from __future__ import annotations

from uuid import UUID

from django.contrib.auth.models import User
from django.db.models import QuerySet

from agents import permissions
from agents.models import AgentTask, Checkpoint, Suspension, TaskStatus
from agents_project.errors import NotFound


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
