"""Why a task is where it is: one read that the console's task page, its task list and
the API's task detail share (issue 13: "the task page answers why at the top").

``task_diagnosis(task)`` answers, from the task row, its open wait, its latest audit
events and the circuit breakers' shared state:

- what the task waits for: a person (approval), a named event, a timer, an open
  circuit breaker, a retry timer, a worker, or nothing (it has ended);
- its last error: the latest ``step_failed``, ``dead_lettered``, ``schema_refused`` or
  ``worker_lost`` event, else ``task.error``;
- the attempt count, the next retry time, the open breaker (if the step waits on one),
  the deadline.

Everything here reads; nothing writes. Breaker state comes from ``tools.breakers``'
public read functions only (``breaker_status``); if Redis is unreachable the breaker is
reported with the state ``unknown`` rather than failing the page.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone
from redis import RedisError

from agents.models import ACTIVE_STATUSES, AgentTask, Suspension, TaskStatus
from agents.selectors import task_open_suspension
from audit.models import ERROR_EVENT_TYPES, AuditEvent, DeadLetter, EventType
from tools import breakers

# Audit events that carry an error worth showing an operator, newest first (a partial
# index on (task, seq DESC) holds them: the last-error lookup reads a few entries).
ERROR_EVENTS = ERROR_EVENT_TYPES
# The task list looks for the last error among a task's latest events only (a bounded
# index scan per row, however long the trail): a failure that matters now is recent.
LIST_WINDOW = 30
# A task's events are no older than the task (a day's margin for clocks apart): on the
# partitioned trail (audit.0011) this bound lets PostgreSQL skip the months before the
# task when it runs the list's per-row subqueries.
EVENTS_NOT_BEFORE_TASK = timedelta(days=1)
# ``CircuitOpen`` (agents.errors), as the engine records it in ``error_type``.
CIRCUIT_OPEN = "CircuitOpen"


def task_diagnosis(task: AgentTask, *, now: datetime | None = None) -> dict[str, Any]:
    """Why ``task`` is where it is, for a person.

    Returns a dict (the API's ``diagnosis``; every time is an aware datetime)::

        {
          "status": "running",
          "summary": "waits for circuit breaker 'http:db:5432' to close (retry at ...)",
          "waiting_on": {"kind": "approval" | "event" | "timer" | "breaker" | "retry"
                                 | "admission" | "worker" | "operator",
                         "detail": str, "since": datetime | None,
                         "until": datetime | None} | None,
          "last_error": {"message": str, "type": str, "step": int | None,
                         "seq": int | None, "at": datetime | None} | None,
          "attempt": int,            # failed attempts of the current step
          "next_retry_at": datetime | None,
          "open_breaker": {"name": str, "state": "open" | "half-open" | "closed"
                                                 | "unknown",
                           "forced": bool, "opened_at": datetime | None,
                           "remaining_seconds": float | None} | None,
          "deadline": datetime | None,
          "deadline_in_seconds": float | None,   # negative once passed
        }

    ``open_breaker`` is set when the current step waits on a breaker (its last attempt
    ended ``CircuitOpen``), whatever that breaker's state is now. Costs four indexed
    queries at most, plus one Redis read when a breaker is involved.
    """
    now = now or timezone.now()
    last_error = _last_error(task)
    failure = _latest_step_failure(task) if task.status == TaskStatus.RUNNING else None
    breaker_name = _waiting_breaker(task, failure)
    open_breaker = _breaker(breaker_name) if breaker_name else None
    waiting = _waiting_on(task, failure=failure, breaker=open_breaker, now=now)
    deadline_in = (task.deadline - now).total_seconds() if task.deadline else None
    return {
        "status": task.status,
        "summary": _summary(task, waiting, last_error),
        "waiting_on": waiting,
        "last_error": last_error,
        "attempt": task.attempt,
        "next_retry_at": task.retry_at,
        "open_breaker": open_breaker,
        "deadline": task.deadline,
        "deadline_in_seconds": round(deadline_in, 3) if deadline_in is not None else None,
    }


def task_error_text(task: AgentTask) -> str:
    """The task's error for the API's ``error`` field: ``task.error``, or for a task
    that is dead-lettered (whose row keeps no error) its dead letter's error.

    Uses ``task.dead_letter_error`` when the queryset was annotated by
    ``tasks_with_console_columns`` (no extra query per row)."""
    if task.error:
        return task.error
    if task.status != TaskStatus.DEAD_LETTERED:
        return ""
    annotated = getattr(task, "dead_letter_error", None)
    if annotated is not None:
        return str(annotated)
    letter = (
        DeadLetter.objects.filter(task=task, requeued_at__isnull=True)
        .order_by("-created_at", "-id")
        .values_list("error", flat=True)
        .first()
    )
    return letter or ""


def tasks_with_console_columns(tasks: QuerySet[AgentTask]) -> QuerySet[AgentTask]:
    """``tasks`` annotated with what the console's task list shows per row, as
    subqueries bounded per task (no per-row queries from Python):

    ``last_error_text``, ``last_error_type``, ``last_error_step`` (the latest error event
    among the task's last ``LIST_WINDOW`` events), ``wait_kind``, ``wait_reason``,
    ``wait_event``, ``wait_wake_at`` (its open suspension), ``dead_letter_error``.
    """
    recent_errors = AuditEvent.objects.filter(
        task=OuterRef("pk"),
        seq__gt=OuterRef("audit_seq") - LIST_WINDOW,
        type__in=ERROR_EVENTS,
        created_at__gte=OuterRef("created_at") - EVENTS_NOT_BEFORE_TASK,
    ).order_by("-seq")
    open_wait = Suspension.objects.filter(
        task=OuterRef("pk"), step=OuterRef("current_step") - 1, resolved_at__isnull=True
    )
    letter = DeadLetter.objects.filter(task=OuterRef("pk"), requeued_at__isnull=True).order_by(
        "-created_at", "-id"
    )
    return tasks.annotate(
        last_error_text=Subquery(recent_errors.values("payload__error")[:1]),
        last_error_type=Subquery(recent_errors.values("type")[:1]),
        last_error_class=Subquery(recent_errors.values("payload__error_type")[:1]),
        last_error_step=Subquery(recent_errors.values("step")[:1]),
        wait_kind=Subquery(open_wait.values("kind")[:1]),
        wait_reason=Subquery(open_wait.values("reason")[:1]),
        wait_event=Subquery(open_wait.values("event_name")[:1]),
        wait_wake_at=Subquery(open_wait.values("wake_at")[:1]),
        wait_since=Subquery(open_wait.values("created_at")[:1]),
        dead_letter_error=Subquery(letter.values("error")[:1]),
    )


def with_dead_letter_error(tasks: QuerySet[AgentTask]) -> QuerySet[AgentTask]:
    """``tasks`` annotated with ``dead_letter_error`` only (the API's task list)."""
    letter = DeadLetter.objects.filter(task=OuterRef("pk"), requeued_at__isnull=True).order_by(
        "-created_at", "-id"
    )
    return tasks.annotate(dead_letter_error=Subquery(letter.values("error")[:1]))


def waiting_on_short(task: AgentTask) -> str:
    """One short phrase for the list's "waiting on" column, from the annotations of
    ``tasks_with_console_columns`` (no query)."""
    status = task.status
    if status == TaskStatus.SUSPENDED:
        kind = getattr(task, "wait_kind", None)
        if kind == Suspension.Kind.APPROVAL:
            return f"approval: {getattr(task, 'wait_reason', '') or '?'}"
        if kind == Suspension.Kind.EVENT:
            return f"event {getattr(task, 'wait_event', '') or '?'}"
        if kind == Suspension.Kind.TIMER:
            wake = getattr(task, "wait_wake_at", None)
            return f"timer until {_clock(wake)}" if wake else "timer"
        if kind == Suspension.Kind.CHILDREN:
            return f"children (join {getattr(task, 'wait_reason', '') or '?'})"
        return "a wait"
    if status == TaskStatus.PENDING and task.queued_for_admission:
        return "admission (owner at its limit)"
    if status == TaskStatus.RUNNING and task.retry_at is not None:
        if getattr(task, "last_error_class", None) == CIRCUIT_OPEN:
            return "open circuit breaker"
        return f"retry at {_clock(task.retry_at)}"
    if status in (TaskStatus.PENDING, TaskStatus.RUNNING):
        return "a worker"
    if status == TaskStatus.DEAD_LETTERED:
        return "an operator (requeue)"
    return ""


def last_error_short(task: AgentTask, width: int = 80) -> str:
    """The list's "last error" column, from the annotations (no query)."""
    text = getattr(task, "last_error_text", None) or task_error_text(task)
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# --- the parts ----------------------------------------------------------------------------


def _last_error(task: AgentTask) -> dict[str, Any] | None:
    event = (
        AuditEvent.objects.filter(task=task, type__in=ERROR_EVENTS)
        .order_by("-seq")
        .only("seq", "type", "step", "payload", "created_at")
        .first()
    )
    if event is not None:
        payload = event.payload
        if event.type == EventType.WORKER_LOST:
            message = f"the worker running step {event.step} died ({payload.get('losses')} times)"
        elif event.type == EventType.SCHEMA_REFUSED:
            message = str(payload.get("reason", ""))
        else:
            message = str(payload.get("error", ""))
        return {
            "message": message,
            "type": str(payload.get("error_type") or event.type),
            "step": event.step,
            "seq": event.seq,
            "at": event.created_at,
        }
    text = task_error_text(task)
    if text:
        return {"message": text, "type": task.status, "step": None, "seq": None, "at": None}
    return None


def _latest_step_failure(task: AgentTask) -> AuditEvent | None:
    """The last ``step_failed`` of the current step, if the task is waiting to retry."""
    if task.retry_at is None:
        return None
    return (
        AuditEvent.objects.filter(task=task, type=EventType.STEP_FAILED, step=task.current_step)
        .order_by("-seq")
        .first()
    )


def _waiting_breaker(task: AgentTask, failure: AuditEvent | None) -> str | None:
    """The breaker the current step waits on: the one named by the failed tool result
    that preceded a ``CircuitOpen`` step failure (``tools.runner`` records it)."""
    if failure is None or failure.payload.get("error_type") != CIRCUIT_OPEN:
        return None
    result = (
        AuditEvent.objects.filter(
            task=task,
            type=EventType.TOOL_RESULT,
            step=failure.step,
            seq__lt=failure.seq,
            payload__error_type=CIRCUIT_OPEN,
        )
        .order_by("-seq")
        .first()
    )
    if result is None or not result.payload.get("breaker"):
        return None
    return str(result.payload["breaker"])


def _breaker(name: str) -> dict[str, Any]:
    try:
        status = breakers.breaker_status(name)
    except RedisError:
        return {
            "name": name,
            "state": "unknown",
            "forced": False,
            "opened_at": None,
            "remaining_seconds": None,
        }
    return {
        "name": name,
        "state": status.state,
        "forced": status.forced,
        "opened_at": status.opened_at,
        "remaining_seconds": status.remaining,
    }


def _waiting_on(
    task: AgentTask,
    *,
    failure: AuditEvent | None,
    breaker: dict[str, Any] | None,
    now: datetime,
) -> dict[str, Any] | None:
    status = task.status
    if status == TaskStatus.SUSPENDED:
        wait = task_open_suspension(task=task)
        if wait is None:
            return {"kind": "worker", "detail": "resumption", "since": None, "until": None}
        if wait.kind == Suspension.Kind.APPROVAL:
            detail = f"approval: {wait.reason}" if wait.reason else "approval"
        elif wait.kind == Suspension.Kind.EVENT:
            detail = f"event {wait.event_name!r}"
        elif wait.kind == Suspension.Kind.CHILDREN:
            detail = _children_detail(task, wait)
        else:
            detail = "a timer"
        return {
            "kind": wait.kind,
            "detail": detail,
            "since": wait.created_at,
            "until": wait.wake_at,
        }
    if status == TaskStatus.RUNNING and task.retry_at is not None:
        since = failure.created_at if failure is not None else None
        if breaker is not None:
            return {
                "kind": "breaker",
                "detail": breaker_phrase(breaker),
                "since": since,
                "until": task.retry_at,
            }
        return {
            "kind": "retry",
            "detail": f"attempt {task.attempt + 1} of step {task.current_step}",
            "since": since,
            "until": task.retry_at,
        }
    if status == TaskStatus.PENDING and task.queued_for_admission:
        return {
            "kind": "admission",
            "detail": (
                "its owner's limit of tasks running at once (AGENTS_OWNER_MAX_RUNNING or"
                " the agent's max_running_per_owner); admitted in turn as places free"
            ),
            "since": task.created_at,
            "until": None,
        }
    if status in (TaskStatus.PENDING, TaskStatus.RUNNING) and task.needs_state_version is not None:
        # Refused and parked (agents.core.engine): it waits for a worker that can run it.
        if task.needs_state_version > 0:
            needed = f"code that knows state schema {task.needs_state_version}"
        else:
            needed = f"{task.agent_name} version {task.agent_version}"
        return {
            "kind": "worker",
            "detail": f"step {task.current_step} waits for a worker running {needed}",
            "since": failure.created_at if failure is not None else task.updated_at,
            "until": None,
        }
    if status in (TaskStatus.PENDING, TaskStatus.RUNNING):
        return {
            "kind": "worker",
            "detail": f"step {task.current_step} queued or running",
            "since": task.updated_at,
            "until": None,
        }
    if status == TaskStatus.DEAD_LETTERED:
        return {
            "kind": "operator",
            "detail": "an operator to requeue or cancel it (it does not go on by itself)",
            "since": task.status_changed_at,
            "until": None,
        }
    return None


def _children_detail(task: AgentTask, wait: Suspension) -> str:
    """``"children: 2 of 5 completed, 3 live; join all"``, of the step that waits."""
    children = AgentTask.objects.filter(parent=task, spawn_step=wait.step)
    counts = children.aggregate(
        completed=Count("pk", filter=Q(status=TaskStatus.COMPLETED)),
        live=Count("pk", filter=Q(status__in=ACTIVE_STATUSES)),
    )
    return (
        f"children: {counts['completed']} of {wait.children_count} completed, "
        f"{counts['live']} live; join {wait.reason}"
    )


def _summary(
    task: AgentTask, waiting: dict[str, Any] | None, last_error: dict[str, Any] | None
) -> str:
    status = task.status
    error = last_error["message"] if last_error else ""
    if status == TaskStatus.COMPLETED:
        return "Completed."
    if status == TaskStatus.CANCELLED:
        return "Cancelled."
    if status == TaskStatus.TIMED_OUT:
        return (
            f"Timed out: its deadline {_clock(task.deadline)} passed."
            if task.deadline
            else ("Timed out.")
        )
    if status == TaskStatus.FAILED:
        return f"Failed: {error}" if error else "Failed."
    if status == TaskStatus.DEAD_LETTERED:
        return f"Dead-lettered: {error}" if error else "Dead-lettered."
    if waiting is None:
        return status.capitalize()
    kind = waiting["kind"]
    if kind == "breaker":
        return (
            f"Waiting on {waiting['detail']}; the step runs again at "
            f"{_clock(waiting['until'])} without spending an attempt."
        )
    if kind == "retry":
        return f"Retrying after an error: {waiting['detail']} at {_clock(waiting['until'])}."
    if kind == "approval":
        return f"Waiting for a person's {waiting['detail']}"
    if kind == "event":
        return f"Waiting for {waiting['detail']}."
    if kind == "timer":
        return f"Waiting for a timer until {_clock(waiting['until'])}."
    if kind == "admission":
        return f"Waiting for admission: {waiting['detail']}."
    if kind == "children":
        return f"Waiting for its {waiting['detail']}."
    return f"Waiting for a worker: {waiting['detail']}."


def breaker_phrase(breaker: dict[str, Any]) -> str:
    """``open circuit breaker 'x' (held open by an operator)``, ``circuit breaker 'x',
    now closed``: the breaker a step waits on, as the console says it."""
    name, state = breaker["name"], breaker["state"]
    phrase = (
        f"open circuit breaker {name!r}"
        if state == "open"
        else (f"circuit breaker {name!r}, now {state}")
    )
    return phrase + (" (held open by an operator)" if breaker["forced"] else "")


def _clock(when: datetime | None) -> str:
    if when is None:
        return "-"
    return timezone.localtime(when).strftime("%Y-%m-%d %H:%M:%S %Z")


def task_step_durations(task: AgentTask, *, limit: int = 200) -> list[dict[str, Any]]:
    """The task's committed steps (its ``step`` audit events, the latest ``limit``), in
    order, for the console's duration bars::

        [{"seq": int, "step": int, "outcome": str, "duration_ms": float,
          "ended_at": datetime, "waited_ms": float | None}, ...]

    ``waited_ms`` is the time between the previous step's commit and this step's start
    (queueing, retries, suspensions); None for the first one shown.
    """
    events = list(
        AuditEvent.objects.filter(task=task, type=EventType.STEP)
        .order_by("-seq")
        .only("seq", "step", "payload", "created_at")[:limit]
    )[::-1]
    rows: list[dict[str, Any]] = []
    previous_end: datetime | None = None
    for event in events:
        ms = float(event.payload.get("duration_ms") or 0.0)
        waited = None
        if previous_end is not None:
            started = event.created_at.timestamp() * 1000 - ms
            waited = max(started - previous_end.timestamp() * 1000, 0.0)
        rows.append(
            {
                "seq": event.seq,
                "step": event.step,
                "outcome": str(event.payload.get("outcome", "")),
                "duration_ms": ms,
                "ended_at": event.created_at,
                "waited_ms": waited,
            }
        )
        previous_end = event.created_at
    return rows
