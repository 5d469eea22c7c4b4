"""Who may see and act on what: one rule for the API, the admin and the commands.

Two things grant access, nothing else (``is_staff`` alone grants nothing; it only lets a
user sign in to the admin):

- **Ownership.** A user sees and operates their own tasks (and those tasks' dead
  letters): start, follow, approve (unless the agent says otherwise, see
  ``agents.approvals``), signal, cancel, replay, requeue.
- **Django model permissions**, given to a user or, better, to a group:

  ==============================  ===================================================
  ``agents.view_agenttask``       read every tenant's tasks (list, detail, audit,
                                  checkpoints)
  ``agents.change_agenttask``     operate every tenant's tasks (approve, signal,
                                  cancel, replay); implies view
  ``audit.view_deadletter``       read every tenant's dead letters
  ``audit.change_deadletter``     requeue any dead letter; implies view
  ``agents.hold_agenttask``       place and release a legal hold on any task
                                  (``agents.retention``); owners cannot
  ``tools.view_breaker``          read the circuit breakers (API, ``/admin/breakers/``)
  ``tools.change_breaker``        force breakers open or closed; implies view
  ==============================  ===================================================

The ``operators`` group (``python manage.py operator_group``) holds all of them. A user
who may see a task but not change it is refused with ``Forbidden`` (403); a task the
user may not see at all is ``NotFound`` (404), so its existence is not disclosed.

``user=None`` is the system (a command run without ``--as``, the scheduler, a worker):
it sees and may do everything.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, Permission
from django.db.models import QuerySet

from agents.models import AgentTask
from agents_project.errors import Forbidden, NotFound

TASK_VIEW = "agents.view_agenttask"
TASK_HOLD = "agents.hold_agenttask"
TASK_CHANGE = "agents.change_agenttask"
DEAD_LETTER_VIEW = "audit.view_deadletter"
DEAD_LETTER_CHANGE = "audit.change_deadletter"
AUDIT_VIEW = "audit.view_auditevent"
BREAKER_VIEW = "tools.view_breaker"
BREAKER_CHANGE = "tools.change_breaker"
SCHEDULE_VIEW = "agents.view_schedule"
SCHEDULE_CHANGE = "agents.change_schedule"

OPERATOR_GROUP = "operators"
OPERATOR_PERMISSIONS = (
    TASK_VIEW,
    TASK_CHANGE,
    AUDIT_VIEW,
    DEAD_LETTER_VIEW,
    DEAD_LETTER_CHANGE,
    BREAKER_VIEW,
    BREAKER_CHANGE,
    SCHEDULE_VIEW,
    SCHEDULE_CHANGE,
)


def has(user: Any, *perms: str) -> bool:
    """True if ``user`` (``None``: the system) is active and holds any of ``perms``."""
    if user is None:
        return True
    if not getattr(user, "is_active", False):
        return False
    return any(user.has_perm(perm) for perm in perms)


def _is_owner(user: Any, owner_id: int) -> bool:
    return bool(user is not None and getattr(user, "is_active", False) and user.pk == owner_id)


# --- tasks ------------------------------------------------------------------------------


def tasks_visible_to(user: Any, *, tasks: QuerySet[AgentTask] | None = None) -> QuerySet[AgentTask]:
    """``tasks`` (default: every task) narrowed to those ``user`` may read: all with
    ``view_agenttask`` or ``change_agenttask`` (and for the system, ``None``), else
    the user's own."""
    tasks = AgentTask.objects.all() if tasks is None else tasks
    if has(user, TASK_VIEW, TASK_CHANGE):
        return tasks
    if user is None or not getattr(user, "is_active", False) or user.pk is None:
        return tasks.none()
    return tasks.filter(owner_id=user.pk)


def task_may_view(user: Any, task: AgentTask) -> bool:
    return _is_owner(user, task.owner_id) or has(user, TASK_VIEW, TASK_CHANGE)


def task_may_change(user: Any, task: AgentTask) -> bool:
    """May ``user`` operate ``task`` (approve, signal, cancel, replay)? Its owner, a
    holder of ``change_agenttask``, or the system."""
    return _is_owner(user, task.owner_id) or has(user, TASK_CHANGE)


def task_change_check(user: Any, task: AgentTask) -> None:
    """Raise ``NotFound`` if ``user`` may not see ``task``, ``Forbidden`` if they may see
    but not operate it."""
    if task_may_change(user, task):
        return
    if task_may_view(user, task):
        raise Forbidden(f"you may read task {task.pk} but not operate it (needs {TASK_CHANGE})")
    raise NotFound(f"no task {task.pk}")


def task_hold_check(user: Any) -> None:
    """Raise ``Forbidden`` unless ``user`` may place or release legal holds
    (``agents.hold_agenttask``; the system may)."""
    if not has(user, TASK_HOLD):
        raise Forbidden(f"placing or releasing a legal hold needs {TASK_HOLD}")


# --- dead letters -----------------------------------------------------------------------


def dead_letters_visible_to(user: Any, letters: QuerySet[Any]) -> QuerySet[Any]:
    """``letters`` narrowed to those of tasks ``user`` may read: all with
    ``view_deadletter``/``change_deadletter`` (and for the system), else their own."""
    if has(user, DEAD_LETTER_VIEW, DEAD_LETTER_CHANGE):
        return letters
    if user is None or not getattr(user, "is_active", False) or user.pk is None:
        return letters.none()
    return letters.filter(task__owner_id=user.pk)


def dead_letter_change_check(user: Any, letter: Any) -> None:
    """Requeueing needs the task's ownership or ``change_deadletter``: ``Forbidden``
    for a reader, ``NotFound`` for anyone who may not see the letter."""
    if _is_owner(user, letter.task.owner_id) or has(user, DEAD_LETTER_CHANGE):
        return
    if has(user, DEAD_LETTER_VIEW):
        raise Forbidden(
            f"you may read dead letter {letter.pk} but not requeue it (needs {DEAD_LETTER_CHANGE})"
        )
    raise NotFound(f"no dead letter {letter.pk}")


# --- circuit breakers (system-wide: no ownership) ---------------------------------------


def breakers_may_view(user: Any) -> bool:
    return has(user, BREAKER_VIEW, BREAKER_CHANGE)


def breakers_may_change(user: Any) -> bool:
    return has(user, BREAKER_CHANGE)


# --- the operators group ----------------------------------------------------------------


def operator_group_ensure(*, name: str = OPERATOR_GROUP) -> Group:
    """Create (or complete) the group holding every operator permission; idempotent.

    Run after ``migrate`` (the permissions exist from then on). Raises ``LookupError``
    if one is missing (migrations not applied).
    """
    group, _ = Group.objects.get_or_create(name=name)
    wanted = []
    for perm in OPERATOR_PERMISSIONS:
        app_label, codename = perm.split(".")
        found = Permission.objects.filter(
            content_type__app_label=app_label, codename=codename
        ).first()
        if found is None:
            raise LookupError(f"permission {perm} does not exist: run migrate first")
        wanted.append(found)
    group.permissions.add(*wanted)
    return group
