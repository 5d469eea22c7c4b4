"""Reading the audit trail and the dead letters."""

from __future__ import annotations

from uuid import UUID

from django.contrib.auth.models import User
from django.db.models import QuerySet

from agents import permissions
from agents.models import AgentTask
from agents_project.errors import NotFound
from audit.models import AuditEvent, DeadLetter


def audit_events(*, task: AgentTask, after_seq: int = 0) -> QuerySet[AuditEvent]:
    """The task's events in order, from the one after ``after_seq`` (a cursor for paging).

    Served by the unique (task, seq) index: fast on tasks with many thousands of events.
    """
    return AuditEvent.objects.filter(task=task, seq__gt=after_seq).order_by("seq")


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
