"""Reading tasks, as a given user may see them."""

from __future__ import annotations

from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from agents.models import AgentTask, Checkpoint
from agents_project.errors import NotFound


def parse_task_id(value: UUID | str) -> UUID:
    """A task id from user input; a malformed one is simply not found."""
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        raise NotFound(f"no task {value}") from None


def tasks_visible_to(user: AbstractBaseUser | None) -> QuerySet[AgentTask]:
    """Staff (and the system, ``None``) see every task; anyone else only their own."""
    tasks = AgentTask.objects.select_related("owner")
    if user is not None and not user.is_staff:
        tasks = tasks.filter(owner=user)
    return tasks


def task_get(*, task_id: UUID | str, user: AbstractBaseUser | None) -> AgentTask:
    task = tasks_visible_to(user).filter(pk=parse_task_id(task_id)).first()
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


def task_checkpoints(*, task: AgentTask) -> QuerySet[Checkpoint]:
    return Checkpoint.objects.filter(task=task).order_by("step")
