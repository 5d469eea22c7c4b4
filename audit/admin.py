"""The console's audit and dead-letter pages.

Audit events can be read, never added, changed or deleted here, by anyone (superusers
included); on PostgreSQL a trigger refuses UPDATE and DELETE beneath this too.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from agents import permissions
from agents.core.dead_letters import dead_letter_requeue
from agents_project.errors import ApplicationError
from audit.models import AuditEvent, DeadLetter
from audit.services import user_actor
from audit.timeline import describe


def _task_link(task_id: UUID) -> str:
    url = reverse("admin:agents_agenttask_change", args=[task_id])
    return format_html('<a href="{}">{}</a>', url, task_id)


def _by_task_id(queryset: QuerySet[Any], search_term: str) -> QuerySet[Any]:
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
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ("task_link", "seq", "type", "step", "actor", "created_at", "summary")
    list_filter = ("type",)
    search_fields = ("task__id",)
    search_help_text = "A task id (the full UUID): its events, in order."
    show_full_result_count = False
    list_per_page = 100

    @admin.display(description="task", ordering="task")
    def task_link(self, event: AuditEvent) -> str:
        return _task_link(event.task_id)

    @admin.display(description="what happened")
    def summary(self, event: AuditEvent) -> str:
        return describe(event)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent], search_term: str
    ) -> tuple[QuerySet[AuditEvent], bool]:
        return _by_task_id(queryset, search_term), False


class OpenFilter(admin.SimpleListFilter):
    title = "requeued"
    parameter_name = "open"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "not yet (open)"), ("no", "requeued")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> Any:
        if self.value() in ("yes", "no"):
            return queryset.filter(requeued_at__isnull=self.value() == "yes")
        return queryset


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "task_link",
        "step",
        "reason",
        "short_error",
        "attempts",
        "created_at",
        "requeued_at",
        "requeued_by",
    )
    list_filter = (OpenFilter, "reason")
    list_select_related = ("task",)
    search_fields = ("task__id",)
    search_help_text = "A task id (the full UUID)."
    actions = ("requeue_letters",)
    fields = (
        ("task_link", "step"),
        ("reason", "attempts"),
        "error",
        "traceback",
        "message",
        ("created_at", "requeued_at", "requeued_by"),
    )
    readonly_fields = (
        "task_link",
        "step",
        "reason",
        "attempts",
        "error",
        "traceback",
        "message",
        "created_at",
        "requeued_at",
        "requeued_by",
    )

    @admin.display(description="task", ordering="task")
    def task_link(self, letter: DeadLetter) -> str:
        return _task_link(letter.task_id)

    @admin.display(description="error")
    def short_error(self, letter: DeadLetter) -> str:
        return letter.error if len(letter.error) <= 120 else letter.error[:117] + "..."

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[DeadLetter], search_term: str
    ) -> tuple[QuerySet[DeadLetter], bool]:
        return _by_task_id(queryset, search_term), False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        user = request.user
        return bool(user.is_staff and permissions.has(user, permissions.DEAD_LETTER_CHANGE))

    @admin.action(description="Requeue selected dead letters", permissions=["operate"])
    def requeue_letters(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        ok = 0
        for letter in queryset:
            try:
                dead_letter_requeue(dead_letter_id=letter.pk, actor=user_actor(request.user))
                ok += 1
            except ApplicationError as exc:
                self.message_user(request, f"{letter.pk}: {exc.message}", messages.WARNING)
        if ok:
            self.message_user(request, f"{ok} dead letter(s) requeued.", messages.SUCCESS)
