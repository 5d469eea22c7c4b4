"""Reading the audit trail."""

from __future__ import annotations

from django.db.models import QuerySet

from agents.models import AgentTask
from audit.models import AuditEvent


def audit_events(*, task: AgentTask, after_seq: int = 0) -> QuerySet[AuditEvent]:
    """The task's events in order, from the one after ``after_seq`` (a cursor for paging).

    Served by the unique (task, seq) index: fast on tasks with many thousands of events.
    """
    return AuditEvent.objects.filter(task=task, seq__gt=after_seq).order_by("seq")
