"""The operator console: tasks in the Django admin, read-only, with actions that call
the services (the same ones the API and the commands call).

Signing in needs ``is_staff``; everything else is ``agents.permissions``: reading needs
the ``view`` permission on tasks, acting (cancel, approve, reject, replay) needs
``change`` ("operate"), requeueing also ``audit.change_deadletter``. Nothing here edits
a row directly: a task changes only through the state machine, by way of a service.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db.models import Exists, OuterRef, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from agents import permissions
from agents.core.dead_letters import dead_letter_requeue
from agents.core.state_machine import FINAL
from agents.core.suspensions import task_approve, task_cancel
from agents.definition import registered_agents
from agents.diagnosis import (
    last_error_short,
    task_diagnosis,
    task_error_text,
    task_step_durations,
    tasks_with_console_columns,
    waiting_on_short,
)
from agents.models import AgentTask, Schedule, ScheduleFiring, WorkerVersion
from agents.retention import task_legal_hold_set
from agents.schedules import schedule_pause
from agents.search import task_search, task_search_estimate
from agents.selectors import (
    dead_letters_visible_to,
    task_checkpoints,
    task_children,
    task_open_suspension,
)
from agents.services import task_replay
from agents_project.admin_paging import KeysetAdminMixin
from agents_project.errors import ApplicationError, Conflict, InvalidInput
from agents_project.tracing import trace_url
from audit.admin import ReadOnlyAdmin, by_task_id
from audit.admin import task_link as task_link_html
from audit.models import DeadLetter, EventType
from audit.selectors import audit_events
from audit.services import user_actor
from audit.timeline import describe

# Children listed on a task's admin page (the API lists them all).
CHILDREN_SHOWN = 50
# The task page shows this many audit events and checkpoints at a time.
TIMELINE_PAGE = 200
STEP_BARS = 200
CHECKPOINTS_SHOWN = 50
JSON_SHOWN = 20_000


def duration(delta: timedelta) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``4 min 10 s``, ``12 s``: two units, enough to read."""
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {seconds} s"
    return f"{seconds} s"


def ms_text(ms: float | None) -> str:
    """``0.024 ms``, ``12.3 ms``, ``4.64 s``, ``3 min 10 s``: a step's time, readably."""
    if ms is None:
        return ""
    if ms < 1:
        return f"{ms:.3f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    return duration(timedelta(milliseconds=ms))


def relative(when: datetime | None, now: datetime) -> str:
    """``in 4 min 10 s``, ``12 s ago``, ``now``."""
    if when is None:
        return ""
    delta = when - now
    if abs(delta.total_seconds()) < 1:
        return "now"
    return f"in {duration(delta)}" if delta.total_seconds() > 0 else f"{duration(-delta)} ago"


def bar_percent(value: float, longest: float) -> float:
    """A duration bar's width, in percent of the longest one (at least 0.5 to be seen)."""
    if longest <= 0:
        return 0.5
    return round(max(value / longest * 100, 0.5), 2)


def pretty_json(value: Any) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    if len(text) > JSON_SHOWN:
        text = text[:JSON_SHOWN] + f"\n... ({len(text) - JSON_SHOWN} more characters)"
    return format_html('<pre class="agents-json">{}</pre>', text)


def operator(request: HttpRequest) -> User:
    """The signed-in user (every console view requires one)."""
    return cast(User, request.user)


def open_dead_letter_id(task: AgentTask) -> int | None:
    letter = dead_letters_visible_to(None, open=True, task_id=task.pk).first()
    return letter.pk if letter else None


class OwnerFilter(admin.SimpleListFilter):
    """Tasks of one user; lists the users who have tasks (an EXISTS per user on the
    (owner, created_at) index, not a scan of the tasks)."""

    title = "owner"
    parameter_name = "owner"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        owners = User.objects.filter(
            Exists(AgentTask.objects.filter(owner=OuterRef("pk")))
        ).order_by("username")[:100]
        return [(str(user.pk), user.get_username()) for user in owners]

    def queryset(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> Any:
        value = self.value()
        if value and value.isascii() and value.isdigit():
            return queryset.filter(owner_id=int(value))
        return queryset


class AgeFilter(admin.SimpleListFilter):
    """Tasks by how long ago they were created."""

    title = "age"
    parameter_name = "age"
    AGES = {
        "1h": ("under an hour", None, timedelta(hours=1)),
        "1d": ("an hour to a day", timedelta(hours=1), timedelta(days=1)),
        "7d": ("a day to a week", timedelta(days=1), timedelta(days=7)),
        "old": ("over a week", timedelta(days=7), None),
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(key, label) for key, (label, _, _) in self.AGES.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> Any:
        age = self.AGES.get(self.value() or "")
        if age is None:
            return queryset
        now = timezone.now()
        _, older_than, younger_than = age
        if older_than is not None:
            queryset = queryset.filter(created_at__lte=now - older_than)
        if younger_than is not None:
            queryset = queryset.filter(created_at__gt=now - younger_than)
        return queryset


class AgentFilter(admin.SimpleListFilter):
    """Tasks of one agent; lists the agents this deployment knows (the registry, and the
    agents workers announce), not a ``SELECT DISTINCT`` over every task."""

    title = "agent"
    parameter_name = "agent_name__exact"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = set(registered_agents()) | set(
            WorkerVersion.objects.order_by().values_list("agent", flat=True).distinct()
        )
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> Any:
        value = self.value()
        return queryset.filter(agent_name=value) if value else queryset


@admin.register(AgentTask)
class AgentTaskAdmin(KeysetAdminMixin, ReadOnlyAdmin):
    list_display = (
        "short_id",
        "agent_name",
        "status_badge",
        "owner",
        "current_step",
        "attempt",
        "waiting_on",
        "next_retry",
        "last_error",
        "age",
        "time_in_status",
    )
    list_filter = ("status", AgentFilter, OwnerFilter, AgeFilter)
    list_select_related = ("owner",)
    search_fields = ("id",)
    search_help_text = (
        "A task id, an idempotency key, an agent, an owner or error text; narrow with "
        'agent:NAME owner:USER error:"TEXT" after:2026-11-01 before:2026-12-01.'
    )
    # Newest first (then by id): pages by key on the (created_at, id) index, however
    # deep, with an estimated count (agents_project.admin_paging); the columns that can
    # be sorted the other way fall back to numbered pages.
    ordering = ("-created_at",)
    list_per_page = 50
    actions = (
        "cancel_tasks",
        "approve_tasks",
        "reject_tasks",
        "replay_tasks",
        "requeue_tasks",
        "hold_tasks",
        "release_tasks",
    )
    change_form_template = "admin/agents/agenttask/change_form.html"
    change_list_template = "admin/agents/agenttask/change_list.html"
    readonly_fields = (
        "id",
        "agent_name",
        "agent_version",
        "owner",
        "status",
        "current_step",
        "attempt",
        "worker_losses",
        "idempotency_key",
        "created_at",
        "updated_at",
        "status_changed_at",
        "finished_at",
        "deadline",
        "error_text",
        "result_json",
        "input_json",
        "replayed_from_link",
        "replayed_from_step",
        "trace_link",
        "parent_link",
        "children_links",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    ("id", "status"),
                    ("agent_name", "agent_version"),
                    ("owner", "idempotency_key"),
                    ("current_step", "attempt", "worker_losses"),
                    "trace_link",
                )
            },
        ),
        (
            "Times",
            {
                "fields": (
                    ("created_at", "status_changed_at"),
                    ("updated_at", "finished_at"),
                    "deadline",
                )
            },
        ),
        ("Outcome", {"fields": ("error_text", "result_json")}),
        ("Input", {"fields": ("input_json",), "classes": ("collapse",)}),
        ("Replay", {"fields": (("replayed_from_link", "replayed_from_step"),)}),
        ("Parent and children", {"fields": ("parent_link", "children_links")}),
    )

    # --- columns and fields -------------------------------------------------------------

    @admin.display(description="task", ordering="id")
    def short_id(self, task: AgentTask) -> str:
        return str(task.pk)

    @admin.display(description="error")
    def error_text(self, task: AgentTask) -> str:
        return task_error_text(task) or "-"

    @admin.display(description="status", ordering="status")
    def status_badge(self, task: AgentTask) -> str:
        return format_html(
            '<span class="agents-badge agents-badge--small agents-badge--{}">{}</span>',
            task.status,
            task.get_status_display(),
        )

    @admin.display(description="waiting on")
    def waiting_on(self, task: AgentTask) -> str:
        return waiting_on_short(task)

    @admin.display(description="next retry", ordering="retry_at")
    def next_retry(self, task: AgentTask) -> str:
        if task.retry_at is None:
            return ""
        return format_html(
            '<span title="{}">in {}</span>', task.retry_at, duration(task.retry_at - timezone.now())
        )

    @admin.display(description="last error")
    def last_error(self, task: AgentTask) -> str:
        return last_error_short(task)

    def get_queryset(self, request: HttpRequest) -> QuerySet[AgentTask]:
        return tasks_with_console_columns(super().get_queryset(request))

    @admin.display(description="age", ordering="created_at")
    def age(self, task: AgentTask) -> str:
        return duration(timezone.now() - task.created_at)

    @admin.display(description="time in status", ordering="status_changed_at")
    def time_in_status(self, task: AgentTask) -> str:
        return duration(timezone.now() - task.status_changed_at)

    @admin.display(description="result")
    def result_json(self, task: AgentTask) -> str:
        return pretty_json(task.result)

    @admin.display(description="input")
    def input_json(self, task: AgentTask) -> str:
        return pretty_json(task.input)

    @admin.display(description="trace")
    def trace_link(self, task: AgentTask) -> str:
        """The task's trace id, linked to the operator's trace viewer when
        ``AGENTS_TRACE_URL_TEMPLATE`` is set."""
        trace_id = task.trace_id
        if not trace_id:
            return "-"
        url = trace_url(trace_id)
        if not url:
            return trace_id
        return format_html('<a href="{}" rel="noopener" target="_blank">{}</a>', url, trace_id)

    @admin.display(description="replayed from")
    def replayed_from_link(self, task: AgentTask) -> str:
        if task.replayed_from_id is None:
            return "-"
        url = reverse("admin:agents_agenttask_change", args=[task.replayed_from_id])
        return format_html('<a href="{}">{}</a>', url, task.replayed_from_id)

    @admin.display(description="parent")
    def parent_link(self, task: AgentTask) -> str:
        if task.parent_id is None:
            return "-"
        url = reverse("admin:agents_agenttask_change", args=[task.parent_id])
        return format_html(
            '<a href="{}">{}</a> (step {}, child {})',
            url,
            task.parent_id,
            task.spawn_step,
            task.spawn_index,
        )

    @admin.display(description="children")
    def children_links(self, task: AgentTask) -> str:
        """The children its steps started, in order (at most ``CHILDREN_SHOWN``)."""
        if not task.spawned:
            return "-"
        rows = task_children(task=task).values_list("pk", "agent_name", "status", "spawn_step")
        links = format_html_join(
            mark_safe("<br>"),  # noqa: S308 (a constant)
            '<a href="{}">{}</a> {} {} (step {})',
            (
                (reverse("admin:agents_agenttask_change", args=[pk]), pk, agent, status, step)
                for pk, agent, status, step in rows[:CHILDREN_SHOWN]
            ),
        )
        more = task.spawned - CHILDREN_SHOWN
        if more > 0:
            return format_html(
                "{}<br>and {} more (GET /api/tasks/{}/children/)", links, more, task.pk
            )
        return links

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[AgentTask], search_term: str
    ) -> tuple[QuerySet[AgentTask], bool]:
        # agents.search: ids, keys, agents, owners, error text, date ranges.
        if not search_term.strip():
            return queryset, False
        try:
            return task_search(queryset, search_term), False
        except InvalidInput as exc:
            self.message_user(request, f"Search: {exc.message}", messages.WARNING)
            return queryset.none(), False

    def search_estimate(self, request: HttpRequest, search_term: str) -> int | None:
        # An error:TEXT search shows the planner's estimate when it is over the count's
        # bound: counting a search that matches much of the table costs more than its page.
        return task_search_estimate(search_term)

    # --- permissions: read-only (ReadOnlyAdmin), acting through services ------------------

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return bool(
            request.user.is_staff and permissions.has(request.user, permissions.TASK_CHANGE)
        )

    def has_hold_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_staff and permissions.has(request.user, permissions.TASK_HOLD))

    # --- the task page: timeline, checkpoints, and what an operator can do ---------------

    def get_urls(self) -> list[Any]:
        operate = path(
            "<path:object_id>/operate/",
            self.admin_site.admin_view(self.operate_view),
            name="agents_agenttask_operate",
        )
        return [operate, *super().get_urls()]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        task = self.get_object(request, object_id)
        if task is not None:
            extra_context = {**(extra_context or {}), **self._task_page(request, task)}
        return super().change_view(request, object_id, form_url, extra_context)

    def _task_page(self, request: HttpRequest, task: AgentTask) -> dict[str, Any]:
        total = task.audit_seq
        try:
            after = min(max(int(request.GET.get("events_after", "")), 0), total)
        except ValueError:
            after = max(total - TIMELINE_PAGE, 0)  # the latest events first
        events = [
            (event, describe(event))
            for event in audit_events(task_id=task.pk, after_seq=after)[:TIMELINE_PAGE]
        ]
        checkpoints = list(task_checkpoints(task=task).reverse()[:CHECKPOINTS_SHOWN])[::-1]
        waiting = task_open_suspension(task=task)
        steps = task_step_durations(task, limit=STEP_BARS)
        longest = max((row["duration_ms"] for row in steps), default=0.0)
        diagnosis = task_diagnosis(task)
        now = timezone.now()
        wait = diagnosis["waiting_on"] or {}
        return {
            "diagnosis": diagnosis,
            "relative": {
                "since": relative(wait.get("since"), now),
                "until": relative(wait.get("until"), now),
                "retry": relative(diagnosis["next_retry_at"], now),
                "deadline": relative(diagnosis["deadline"], now),
                "error": relative((diagnosis["last_error"] or {}).get("at"), now),
            },
            "steps": [
                {
                    **row,
                    "percent": bar_percent(row["duration_ms"], longest),
                    "ran": ms_text(row["duration_ms"]),
                    "waited": ms_text(row["waited_ms"]),
                }
                for row in steps
            ],
            "steps_longest_ms": longest,
            "task_api_url": reverse("task-detail", args=[task.pk]),
            "live": task.status not in FINAL,
            "live_config": {
                "events_url": reverse("task-events", args=[task.pk]),
                "task_url": reverse("task-detail", args=[task.pk]),
                "after": max(total, after + len(events)),
                "follow_timeline": after + TIMELINE_PAGE >= total,
                "event_types": list(EventType.values),
            },
            "operate": self.has_operate_permission(request),
            "operate_url": reverse("admin:agents_agenttask_operate", args=[task.pk]),
            "task": task,
            "waiting": waiting,
            "can_cancel": task.status not in FINAL,
            "can_decide": waiting is not None and waiting.kind == "approval",
            "waiting_tool_args": (
                json.dumps(waiting.tool_args, indent=1) if waiting and waiting.tool_name else ""
            ),
            "dead_letter_id": open_dead_letter_id(task),
            "timeline": events,
            "timeline_total": total,
            "timeline_first": after + 1,
            "timeline_last": after + len(events),
            "timeline_earlier": max(after - TIMELINE_PAGE, 0) if after > 0 else None,
            "timeline_later": after + TIMELINE_PAGE if after + TIMELINE_PAGE < total else None,
            "checkpoints": [(c, pretty_json(c.state)) for c in checkpoints],
            "checkpoints_cut": task.current_step > CHECKPOINTS_SHOWN,
            "replays": list(task.replays.order_by("-created_at")[:20]),
        }

    def operate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST ``action`` (cancel, approve, reject, replay, requeue) for one task."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        action = request.POST.get("action", "")
        target = object_id
        try:
            target = self._operate(request, object_id, action)
        except ApplicationError as exc:
            self.message_user(request, f"{action}: {exc.message}", messages.ERROR)
        return HttpResponseRedirect(reverse("admin:agents_agenttask_change", args=[target]))

    def _operate(self, request: HttpRequest, task_id: str, action: str) -> str:
        user = operator(request)
        comment = request.POST.get("comment", "")
        if action == "cancel":
            task_cancel(task_id=task_id, user=user)
            self.message_user(request, "Task cancelled.", messages.SUCCESS)
        elif action in ("approve", "reject", "edit", "respond"):
            decided: dict[str, Any] = {"decision": action}
            if action == "edit":
                try:
                    decided["args"] = json.loads(request.POST.get("args", ""))
                except ValueError:
                    raise InvalidInput("must be a JSON object", field="args") from None
            if action == "respond":
                decided["message"] = request.POST.get("message", "")
            task_approve(task_id=task_id, user=user, comment=comment, **decided)
            verdict = {"approve": "approved", "reject": "rejected"}.get(action, f"{action}ed")
            self.message_user(request, f"Approval {verdict}.", messages.SUCCESS)
        elif action == "replay":
            try:
                from_step = int(request.POST["from_step"])
            except (KeyError, ValueError):
                raise InvalidInput("must be a step number", field="from_step") from None
            new = task_replay(task_id=task_id, user=user, from_step=from_step)
            self.message_user(
                request, f"Replayed from checkpoint {from_step} as task {new.pk}.", messages.SUCCESS
            )
            return str(new.pk)
        elif action == "requeue":
            task = self.get_object(request, task_id)
            letter_id = open_dead_letter_id(task) if task is not None else None
            if letter_id is None:
                raise Conflict("the task has no dead letter waiting to be requeued")
            permissions.dead_letter_change_check(user, DeadLetter.objects.get(pk=letter_id))
            dead_letter_requeue(dead_letter_id=letter_id, actor=user_actor(user))
            self.message_user(request, "Dead letter requeued.", messages.SUCCESS)
        else:
            raise InvalidInput(f"unknown action {action!r}", field="action")
        return task_id

    # --- list actions ---------------------------------------------------------------------

    def _each(
        self,
        request: HttpRequest,
        tasks: QuerySet[AgentTask],
        done: str,
        act: Callable[[AgentTask], object],
    ) -> None:
        """Run ``act`` on every selected task; one refusal does not stop the others."""
        ok, refused = 0, []
        for task in tasks:
            try:
                act(task)
                ok += 1
            except ApplicationError as exc:
                refused.append(f"{task.pk}: {exc.message}")
        if ok:
            self.message_user(request, f"{ok} task(s) {done}.", messages.SUCCESS)
        for line in refused[:20]:
            self.message_user(request, line, messages.WARNING)

    @admin.action(description="Cancel selected tasks", permissions=["operate"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> None:
        self._each(
            request,
            queryset,
            "cancelled",
            lambda t: task_cancel(task_id=t.pk, user=operator(request)),
        )

    @admin.action(description="Approve selected tasks' approvals", permissions=["operate"])
    def approve_tasks(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> None:
        self._each(
            request,
            queryset,
            "approved",
            lambda t: task_approve(task_id=t.pk, user=operator(request), approved=True),
        )

    @admin.action(description="Reject selected tasks' approvals", permissions=["operate"])
    def reject_tasks(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> None:
        self._each(
            request,
            queryset,
            "rejected",
            lambda t: task_approve(task_id=t.pk, user=operator(request), approved=False),
        )

    @admin.action(
        description="Replay selected tasks from their latest checkpoint", permissions=["operate"]
    )
    def replay_tasks(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> None:
        self._each(
            request,
            queryset,
            "replayed",
            lambda t: task_replay(task_id=t.pk, user=operator(request)),
        )

    @admin.action(description="Requeue selected dead-lettered tasks", permissions=["operate"])
    def requeue_tasks(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> None:
        def requeue(task: AgentTask) -> None:
            letter_id = open_dead_letter_id(task)
            if letter_id is None:
                raise Conflict(f"it is {task.status}, with no dead letter waiting")
            permissions.dead_letter_change_check(
                operator(request), DeadLetter.objects.get(pk=letter_id)
            )
            dead_letter_requeue(dead_letter_id=letter_id, actor=user_actor(operator(request)))

        self._each(request, queryset, "requeued", requeue)

    @admin.action(description="Place selected tasks under legal hold", permissions=["hold"])
    def hold_tasks(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> None:
        self._each(
            request,
            queryset,
            "placed under legal hold",
            lambda t: task_legal_hold_set(
                task_id=t.pk, held=True, reason="admin", user=operator(request)
            ),
        )

    @admin.action(description="Release selected tasks from legal hold", permissions=["hold"])
    def release_tasks(self, request: HttpRequest, queryset: QuerySet[AgentTask]) -> None:
        self._each(
            request,
            queryset,
            "released from legal hold",
            lambda t: task_legal_hold_set(
                task_id=t.pk, held=False, reason="admin", user=operator(request)
            ),
        )


# --- Dead letters -------------------------------------------------------------------------


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
        return task_link_html(letter.task_id)

    @admin.display(description="error")
    def short_error(self, letter: DeadLetter) -> str:
        return letter.error if len(letter.error) <= 120 else letter.error[:117] + "..."

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[DeadLetter], search_term: str
    ) -> tuple[QuerySet[DeadLetter], bool]:
        return by_task_id(queryset, search_term), False

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


class ScheduleFiringInline(admin.TabularInline):
    model = ScheduleFiring
    fields = readonly_fields = ("slot", "outcome", "reason", "task", "actor", "created_at")
    ordering = ("-slot",)
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[ScheduleFiring]:
        return super().get_queryset(request).order_by("-slot")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Schedule)
class ScheduleAdmin(ReadOnlyAdmin):
    """Schedules and the slots they fired (``agents.schedules``). Pausing and resuming
    need ``agents.change_schedule``; creating and editing are the API's and
    ``manage.py schedules``'s, which check every field."""

    list_display = (
        "id",
        "agent_name",
        "when",
        "timezone",
        "owner",
        "overlap",
        "catch_up",
        "paused",
        "next_slot",
    )
    list_filter = ("paused", "agent_name", "overlap", "catch_up")
    search_fields = ("agent_name", "owner__username", "id")
    actions = ("pause_schedules", "resume_schedules")
    inlines = (ScheduleFiringInline,)

    @admin.display(description="when")
    def when(self, schedule: Schedule) -> str:
        return schedule.cron or f"every {schedule.interval_seconds} s"

    def has_operate_permission(self, request: HttpRequest) -> bool:
        user = request.user
        return bool(user.is_staff and permissions.has(user, permissions.SCHEDULE_CHANGE))

    def _pause(self, request: HttpRequest, queryset: QuerySet[Schedule], paused: bool) -> None:
        for schedule in queryset:
            schedule_pause(schedule_id=schedule.pk, user=operator(request), paused=paused)
        done = "paused" if paused else "resumed (from their next slot)"
        self.message_user(request, f"{queryset.count()} schedule(s) {done}.", messages.SUCCESS)

    @admin.action(description="Pause selected schedules", permissions=["operate"])
    def pause_schedules(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._pause(request, queryset, True)

    @admin.action(description="Resume selected schedules", permissions=["operate"])
    def resume_schedules(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._pause(request, queryset, False)
