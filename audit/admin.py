"""The console's audit page (the dead-letter page is ``agents.admin``'s).

Audit events can be read, never added, changed or deleted here, by anyone (superusers
included); on PostgreSQL a trigger refuses UPDATE and DELETE beneath this too.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from agents_project.admin_paging import KeysetAdminMixin
from audit.models import AuditEvent, AuditPartitionRemoval, TaskRemoval
from audit.timeline import describe


def task_link(task_id: UUID) -> str:
    """A link to the task's admin page."""
    url = reverse("admin:agents_agenttask_change", args=[task_id])
    return format_html('<a href="{}">{}</a>', url, task_id)


def by_task_id(queryset: QuerySet[Any], search_term: str) -> QuerySet[Any]:
    """The rows of the task whose full id ``search_term`` is (none for anything else)."""
    term = search_term.strip()
    if not term:
        return queryset
    try:
        return queryset.filter(task_id=UUID(term))
    except ValueError:
        return queryset.none()


class ReadOnlyAdmin(admin.ModelAdmin):
    """Nothing can be added, changed or deleted from the admin, whoever asks."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(KeysetAdminMixin, ReadOnlyAdmin):
    list_display = ("task_link", "seq", "type", "step", "actor", "created_at", "summary")
    list_filter = ("type",)
    search_fields = ("task__id",)
    search_help_text = "A task id (the full UUID): its events, in order."
    list_per_page = 100
    # Newest first by id (the primary key's index); one task's events in their order.
    # Pages by key and an estimated count: flat with millions of events.
    sortable_by = ()

    def get_ordering(self, request: HttpRequest) -> tuple[str, ...]:
        if request.GET.get("q", "").strip():
            return ("task_id", "seq")
        return ("-id",)

    @admin.display(description="task")
    def task_link(self, event: AuditEvent) -> str:
        return task_link(event.task_id)

    @admin.display(description="what happened")
    def summary(self, event: AuditEvent) -> str:
        return describe(event)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent], search_term: str
    ) -> tuple[QuerySet[AuditEvent], bool]:
        return by_task_id(queryset, search_term), False


@admin.register(TaskRemoval)
class TaskRemovalAdmin(ReadOnlyAdmin):
    """Tasks retention removed (``agents.retention``): where each one's archive is."""

    list_display = ("seq", "task_id", "owner", "agent_name", "status", "archive", "created_at")
    list_filter = ("agent_name", "status")
    search_fields = ("task_id",)
    search_help_text = "A task id (the full UUID): its removal record and archive."
    show_full_result_count = False
    list_per_page = 100

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[TaskRemoval], search_term: str
    ) -> tuple[QuerySet[TaskRemoval], bool]:
        return by_task_id(queryset, search_term), False


@admin.register(AuditPartitionRemoval)
class AuditPartitionRemovalAdmin(ReadOnlyAdmin):
    """Month partitions of the audit trail retention dropped (``audit.partitions``)."""

    list_display = ("name", "range_start", "range_end", "events", "tasks", "actor", "created_at")
    list_per_page = 100
