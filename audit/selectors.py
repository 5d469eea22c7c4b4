"""Reading the audit trail (who may read whose trail is ``agents.selectors``' concern)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from audit.models import AuditEvent


def audit_events(*, task_id: Any, after_seq: int = 0) -> QuerySet[AuditEvent]:
    """The task's events in order, from the one after ``after_seq`` (a cursor for paging).

    Served by the unique (task, seq) index: fast on tasks with many thousands of events.
    """
    return AuditEvent.objects.filter(task_id=task_id, seq__gt=after_seq).order_by("seq")
