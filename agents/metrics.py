"""The runtime's metrics: observed where steps run, and read from its tables at scrape time.

Observed (counters and histograms, in prometheus-client's multiprocess mode, see
``agents_project.metrics``): ``agents_step_duration_seconds`` (committed steps, by agent,
buckets from 1 ms), ``agents_step_queue_seconds`` (a step's message published to the step
starting, by agent), ``agents_step_failures_total`` (by agent and the tool that failed,
``none`` when the agent's own code raised), ``agents_tasks_created_total`` (by agent,
counted by ``task_start``) and ``agents_tasks_finished_total`` (by agent and the status
entered: ``completed``, ``failed``, ``timed_out``, ``cancelled``, ``dead_lettered``;
counted by the state machine once the transition commits), ``agents_retention_tasks_total``
(tasks retention handled, by outcome: ``removed``, ``pruned``, ``skipped``, ``failed``,
counted by ``agents.retention``).

Read at scrape time (``database_metrics``, a source of ``AGENTS_METRICS_SOURCES``): tasks
by status (the common finished ones estimated on a large table, ``tasks_by_status``),
suspended tasks, the least recent progress of active tasks, open dead letters, retries
waiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from agents.models import ACTIVE_STATUSES, AgentTask, Suspension, TaskStatus
from agents_project.estimates import table_estimate, value_estimates
from agents_project.metrics import renew_after_fork
from audit.models import DeadLetter

logger = structlog.get_logger(__name__)

# Scripted steps take about a millisecond; model calls seconds; the hard limit is 300 s.
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip
# A step waits in the queue from milliseconds (idle workers) to minutes (a backlog).
QUEUE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip

STEP_DURATION = Histogram(
    "agents_step_duration_seconds",
    "Time a committed step took: the agent's code and its tool calls, by agent.",
    ["agent"],
    buckets=STEP_BUCKETS,
)
STEP_QUEUE_TIME = Histogram(
    "agents_step_queue_seconds",
    "Time a step's message waited: published to the step starting in a worker, by agent.",
    ["agent"],
    buckets=QUEUE_BUCKETS,
)
TASKS_CREATED = Counter("agents_tasks_created", "Tasks accepted, by agent.", ["agent"])
TASKS_FINISHED = Counter(
    "agents_tasks_finished",
    "Tasks that entered a final status or dead_lettered, by agent and that status.",
    ["agent", "status"],
)
STEP_HANDOFFS = Counter(
    "agents_step_handoffs",
    "Steps that handed their wait to another process (the model gateway), by agent.",
    ["agent"],
)
STEP_FAILURES = Counter(
    "agents_step_failures",
    "Failed step attempts, by agent and by the tool that failed (none: the agent's code).",
    ["agent", "tool"],
)

renew_after_fork(
    STEP_DURATION, STEP_QUEUE_TIME, TASKS_CREATED, TASKS_FINISHED, STEP_FAILURES, STEP_HANDOFFS
)

# The statuses counted by agents_tasks_finished_total: the final ones, and dead_lettered
# (a task there waits for an operator; requeued, it is counted again when it ends).
FINISHED = frozenset({"completed", "failed", "timed_out", "cancelled", "dead_lettered"})


def step_committed(*, agent: str, duration_ms: float) -> None:
    """A step's checkpoint committed after ``duration_ms`` of agent and tool time."""
    try:
        STEP_DURATION.labels(agent=agent).observe(duration_ms / 1000)
    except Exception as exc:  # a metric must never fail a step
        logger.warning("step metric not recorded", error=repr(exc))


def step_started(*, agent: str, queued_seconds: float) -> None:
    """A step started in a worker ``queued_seconds`` after its message was published."""
    try:
        STEP_QUEUE_TIME.labels(agent=agent).observe(max(queued_seconds, 0.0))
    except Exception as exc:
        logger.warning("step metric not recorded", error=repr(exc))


def step_handed_off(*, agent: str) -> None:
    """A step of ``agent`` handed its wait off (``agents.core.handoffs``)."""
    try:
        STEP_HANDOFFS.labels(agent=agent).inc()
    except Exception as exc:
        logger.warning("step metric not recorded", error=repr(exc))


RETENTION_TASKS = Counter(
    "agents_retention_tasks",
    "Tasks retention handled, by outcome (removed, pruned, skipped, failed: an archive "
    "that did not verify).",
    ["outcome"],
)


def retention_counted(*, outcome: str, count: int) -> None:
    """``count`` tasks had retention's ``outcome`` (``agents.retention.RunReport``)."""
    try:
        if count:
            RETENTION_TASKS.labels(outcome=outcome).inc(count)
    except Exception as exc:
        logger.warning("retention metric not recorded", error=repr(exc))


def task_created(*, agent: str) -> None:
    """A task of ``agent`` was accepted (call once its transaction commits)."""
    try:
        TASKS_CREATED.labels(agent=agent).inc()
    except Exception as exc:
        logger.warning("task metric not recorded", error=repr(exc))


def task_finished(*, agent: str, status: str) -> None:
    """A task of ``agent`` entered ``status`` (final, or dead_lettered), once committed."""
    try:
        TASKS_FINISHED.labels(agent=agent, status=status).inc()
    except Exception as exc:
        logger.warning("task metric not recorded", error=repr(exc))


def step_failed(*, agent: str, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """A step attempt failed; ``events`` are its audit events so far (a failed tool call
    ends with that tool's ``tool_result``)."""
    try:
        STEP_FAILURES.labels(agent=agent, tool=_failed_tool(events)).inc()
    except Exception as exc:
        logger.warning("step metric not recorded", error=repr(exc))


def _failed_tool(events: Sequence[tuple[str, dict[str, Any]]]) -> str:
    for event_type, payload in reversed(events):
        if event_type == "tool_result":
            return str(payload.get("tool")) if not payload.get("ok") else "none"
    return "none"


# Past this many tasks (PostgreSQL's estimate), the finished statuses' gauges are
# estimates from the planner's statistics instead of a count of the whole table.
EXACT_UP_TO = 10_000


def tasks_by_status() -> dict[str, int]:
    """Tasks in each status. While the table holds up to ``EXACT_UP_TO`` tasks (by
    PostgreSQL's estimate), all are counted. Beyond, the statuses most tasks are in (the
    finished ones among the column's most common values in ``pg_stats``) are estimated
    (``agents_project.estimates``: about 1% off after autovacuum's ANALYZE, which runs as
    the table grows), and the rest, active statuses and rare ones, are counted over the
    status index: a scrape costs the same with a million finished tasks as with a
    thousand."""
    # order_by(): the models' default ordering would join the GROUP BY.
    counted = AgentTask.objects.order_by().values("status").annotate(n=Count("pk"))
    total = table_estimate(AgentTask)
    estimates = value_estimates(AgentTask, "status") if (total or 0) > EXACT_UP_TO else None
    if estimates is None:
        return {row["status"]: row["n"] for row in counted}
    common = {s: n for s, n in estimates.items() if s in TaskStatus.values}
    common = {s: n for s, n in common.items() if s not in ACTIVE_STATUSES}
    rest = [s for s in TaskStatus.values if s not in common]
    exact = {row["status"]: row["n"] for row in counted.filter(status__in=rest)}
    return {**common, **exact}


def database_metrics() -> Iterable[Metric]:
    """Tasks by status, suspended tasks, the least recent progress of active tasks, open
    dead letters and retries waiting, read from PostgreSQL at scrape time."""
    by_status = tasks_by_status()
    tasks = GaugeMetricFamily("agents_tasks", "Tasks in each status.", labels=["status"])
    for status in TaskStatus.values:
        tasks.add_metric([status], by_status.get(status, 0))
    yield tasks

    waits = {
        row["kind"]: row["n"]
        for row in Suspension.objects.filter(
            resolved_at__isnull=True, task__status=TaskStatus.SUSPENDED
        )
        .order_by()
        .values("kind")
        .annotate(n=Count("pk"))
    }
    suspended = GaugeMetricFamily(
        "agents_tasks_suspended",
        "Suspended tasks, by what they wait for (approval, event, timer).",
        labels=["kind"],
    )
    for kind in Suspension.Kind.values:
        suspended.add_metric([kind], waits.get(kind, 0))
    yield suspended

    now = timezone.now()
    # A task waiting out a retry backoff is not stuck (the stuck-task sweep agrees).
    oldest = {
        row["status"]: row["oldest"]
        for row in AgentTask.objects.filter(status__in=ACTIVE_STATUSES, retry_at__isnull=True)
        .order_by()
        .values("status")
        .annotate(oldest=Min("updated_at"))
    }
    idle = GaugeMetricFamily(
        "agents_tasks_oldest_progress_seconds",
        "Seconds since the least recently progressed task in each active status last "
        "made progress, not counting tasks waiting for a retry (0 when there is none).",
        labels=["status"],
    )
    for status in ACTIVE_STATUSES:
        since = oldest.get(status)
        idle.add_metric([status], (now - since).total_seconds() if since else 0.0)
    yield idle

    yield GaugeMetricFamily(
        "agents_dead_letters_open",
        "Dead-lettered tasks not requeued yet: each waits for an operator.",
        value=DeadLetter.objects.filter(requeued_at__isnull=True).count(),
    )
    yield GaugeMetricFamily(
        "agents_steps_awaiting_retry",
        "Failed steps waiting for their backoff to pass before running again.",
        value=AgentTask.objects.filter(retry_at__isnull=False).count(),
    )
