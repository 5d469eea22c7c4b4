"""Prometheus metrics: the numbers RUNBOOK.md's monitoring checklist watches.

Two sources:

- **Observed where things happen** (counters and histograms):
  ``agents_step_duration_seconds`` (histogram of committed steps, by agent, buckets from
  1 ms), ``agents_step_queue_seconds`` (histogram: a step's message published to the step
  starting, by agent), ``agents_step_failures_total`` (by agent and the tool that failed,
  ``none`` when the agent's own code raised), ``agents_tasks_created_total`` (by agent)
  and ``agents_tasks_finished_total`` (by agent and the status entered: ``completed``,
  ``failed``, ``timed_out``, ``cancelled``, ``dead_lettered``; counted once the
  transition commits). HTTP requests of the web process are counted by django-prometheus
  (``django_http_*``). A Celery prefork worker runs steps in child processes and gunicorn
  serves from several, so these use prometheus-client's multiprocess mode: set
  ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the process starts, and every
  child writes its values there.
- **Read when Prometheus scrapes**, from the truth rather than from counters that could
  drift: tasks by status, suspended tasks, the least recent progress of active tasks,
  open dead letters, retries waiting, the work and dead-letter queue depths (a passive
  ``queue_declare``: it creates nothing) and circuit-breaker states. Each source is read
  in its own thread within ``AGENTS_METRICS_SOURCE_TIMEOUT`` seconds (2): a source that
  is down or hangs is reported as ``agents_metrics_source_up{source} 0`` and the scrape
  still answers in time.

Where to scrape:

- ``GET /metrics`` on the web process: the scrape-time gauges, plus every worker's step
  metrics found in ``PROMETHEUS_MULTIPROC_DIR`` when the workers share this host and
  directory (without the directory: this process's own).
- ``AGENTS_METRICS_PORT`` on each worker (when its directory is its own, e.g. one per
  container): that worker's step metrics. Scrape one or the other, not both, or steps
  are counted twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import structlog
from celery import bootsteps
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.utils.crypto import constant_time_compare
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

logger = structlog.get_logger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get(MULTIPROC_DIR_ENV):
    # prometheus-client writes there from the first observation; it must exist by then.
    os.makedirs(os.environ[MULTIPROC_DIR_ENV], exist_ok=True)

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
STEP_FAILURES = Counter(
    "agents_step_failures",
    "Failed step attempts, by agent and by the tool that failed (none: the agent's code).",
    ["agent", "tool"],
)

# The labelled metrics whose ``labels()`` lock a forked child gets renewed.
_RENEWED_AFTER_FORK: list[MetricWrapperBase] = []


def renew_after_fork(*wrappers: MetricWrapperBase) -> None:
    """Give each of ``wrappers`` (labelled metrics, used in pool processes) a free
    ``labels()`` lock in every process forked from this one: prometheus-client holds it
    while it makes a label set's value (opening its file, in multiprocess mode), which
    a thread of a worker's main process may be doing at the instant of a fork (the
    scheduler counting a timed-out task)."""
    _RENEWED_AFTER_FORK.extend(wrappers)


renew_after_fork(STEP_DURATION, STEP_QUEUE_TIME, TASKS_CREATED, TASKS_FINISHED, STEP_FAILURES)

BREAKER_STATES = ("closed", "open", "half-open")
# The statuses counted by agents_tasks_finished_total: the final ones, and dead_lettered
# (a task there waits for an operator; requeued, it is counted again when it ends).
FINISHED = frozenset({"completed", "failed", "timed_out", "cancelled", "dead_lettered"})


# --- Observed in the worker (agents.engine calls these) ---------------------------------


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


# --- Read at scrape time ------------------------------------------------------------------


class RuntimeCollector:
    """Gauges computed from PostgreSQL, the broker and the breakers on every scrape.

    The sources are read concurrently, each in its own daemon thread, and each within
    ``AGENTS_METRICS_SOURCE_TIMEOUT`` seconds. A source that fails or takes longer is
    reported as ``agents_metrics_source_up{source}`` 0 and its gauges are left out,
    rather than failing or stalling the whole scrape. A read that hangs is left behind;
    while it still hangs, later scrapes report that source down without starting another.
    """

    def collect(self) -> Iterator[Metric]:
        timeout = settings.METRICS_SOURCE_TIMEOUT
        up = GaugeMetricFamily(
            "agents_metrics_source_up",
            "1 if the source could be read for this scrape, else 0.",
            labels=["source"],
        )
        reads = [(source, _SourceRead.start(source, read)) for source, read in _sources()]
        deadline = time.monotonic() + timeout
        for source, pending in reads:
            metrics = pending.result(max(deadline - time.monotonic(), 0.0)) if pending else None
            if metrics is None:
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from metrics
        yield up


def _sources() -> tuple[tuple[str, Callable[[], Iterable[Metric]]], ...]:
    return (
        ("database", _database_metrics),
        ("broker", _queue_metrics),
        ("breakers", _breaker_metrics),
    )


class _SourceRead:
    """One source read in a daemon thread; at most one per source at a time."""

    _running: set[str] = set()
    _lock = threading.Lock()

    def __init__(self, source: str, read: Callable[[], Iterable[Metric]]) -> None:
        self.source = source
        self.read = read
        self.done = threading.Event()
        self.metrics: list[Metric] | None = None

    @classmethod
    def start(cls, source: str, read: Callable[[], Iterable[Metric]]) -> _SourceRead | None:
        with cls._lock:
            if source in cls._running:
                logger.warning("metrics source still hanging from an earlier scrape", source=source)
                return None
            cls._running.add(source)
        pending = cls(source, read)
        threading.Thread(target=pending._run, name=f"metrics-{source}", daemon=True).start()
        return pending

    def _run(self) -> None:
        try:
            self.metrics = list(self.read())
        except Exception as exc:
            logger.warning("metrics source unavailable", source=self.source, error=repr(exc))
        finally:
            connections.close_all()  # this thread's own database connection
            with self._lock:
                self._running.discard(self.source)
            self.done.set()

    def result(self, timeout: float) -> list[Metric] | None:
        """The source's metrics, or None if it failed or did not answer in ``timeout`` s."""
        if not self.done.wait(timeout):
            logger.warning("metrics source timed out", source=self.source, seconds=timeout)
            return None
        return self.metrics


def _after_fork_in_child() -> None:
    """Give a forked child free locks (``os.register_at_fork``). A worker's main process
    forks pool processes while its own threads may hold a lock: the metrics server
    reading a source, or the scheduler counting a transition, which holds the lock of
    its metric's ``labels()`` (``renew_after_fork``) and the one lock all of
    prometheus-client's multiprocess values share (its authors presume no threads in
    that mode: prometheus/client_python#431). The child's copy of a held lock is never
    released, and its first metric would wait for it forever. Without
    ``PROMETHEUS_MULTIPROC_DIR`` each value has a lock of its own, not reset here: that
    mode is not for forking workers (module docstring)."""
    _SourceRead._lock = threading.Lock()
    _SourceRead._running = set()
    for wrapper in _RENEWED_AFTER_FORK:
        # The lock ``MetricWrapperBase.__init__`` gives a labelled metric.
        wrapper._lock = threading.Lock()
    # Multiprocess mode: ``lock`` is a variable of the function that made ValueClass,
    # shared by all its methods through one closure cell.
    inc = prometheus_values.ValueClass.inc
    if "lock" in inc.__code__.co_freevars:
        inc.__closure__[inc.__code__.co_freevars.index("lock")].cell_contents = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _database_metrics() -> Iterable[Metric]:
    from django.db.models import Count, Min
    from django.utils import timezone

    from agents.models import ACTIVE_STATUSES, AgentTask, Suspension, TaskStatus
    from audit.models import DeadLetter

    # order_by(): the models' default ordering would join the GROUP BY.
    by_status = {
        row["status"]: row["n"]
        for row in AgentTask.objects.order_by().values("status").annotate(n=Count("pk"))
    }
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


def _queue_metrics() -> Iterable[Metric]:
    from agents_project.celery import app
    from agents_project.topology import dead_letter_queue

    messages = GaugeMetricFamily(
        "agents_queue_messages",
        "Messages ready in the broker queue (work: steps to run; dead_letter: rejected steps).",
        labels=["queue", "role"],
    )
    consumers = GaugeMetricFamily(
        "agents_queue_consumers",
        "Consumers (worker processes) attached to the broker queue.",
        labels=["queue", "role"],
    )
    limit = GaugeMetricFamily(
        "agents_queue_max_messages",
        "Ready messages the work queue takes before publishes are refused "
        "(AGENTS_QUEUE_MAX_LENGTH): task creation then answers 503.",
        labels=["queue"],
    )
    queues = [("work", settings.CELERY_TASK_QUEUES[0])]
    limit.add_metric([queues[0][1].name], settings.AGENTS["QUEUE_MAX_LENGTH"])
    if settings.BROKER_IS_AMQP:
        queues.append(("dead_letter", dead_letter_queue(settings.AGENTS)))
    timeout = settings.METRICS_SOURCE_TIMEOUT
    with app.connection_for_read(connect_timeout=timeout) as conn:
        # One attempt: a broker that is down is reported, not waited for.
        conn.ensure_connection(max_retries=1, timeout=timeout)
        for role, queue in queues:
            # A channel per queue: a passive declare of a missing queue closes its channel.
            channel = conn.channel()
            try:
                _, ready, attached = queue(channel).queue_declare(passive=True)
            finally:
                channel.close()
            messages.add_metric([queue.name, role], ready)
            consumers.add_metric([queue.name, role], attached)
    return [messages, consumers, limit]


def _breaker_metrics() -> Iterable[Metric]:
    from tools.selectors import breaker_states

    state = GaugeMetricFamily(
        "agents_circuit_breaker_state",
        "1 for each circuit breaker's current state (closed, open, half-open), else 0.",
        labels=["breaker", "state"],
    )
    failures = GaugeMetricFamily(
        "agents_circuit_breaker_failures",
        "Consecutive failures each circuit breaker has counted.",
        labels=["breaker"],
    )
    for breaker in breaker_states():
        for name in BREAKER_STATES:
            state.add_metric([breaker.name, name], 1 if breaker.state == name else 0)
        failures.add_metric([breaker.name], breaker.failures)
    return [state, failures]


# --- Exposition ---------------------------------------------------------------------------


class _ThisProcess:
    """This process's own metrics (the default registry), inside another registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def step_metrics_registry() -> CollectorRegistry:
    """The step metrics: of every process writing to ``PROMETHEUS_MULTIPROC_DIR`` if it is
    set, else of this process alone."""
    registry = CollectorRegistry(auto_describe=False)
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if path:
        MultiProcessCollector(registry, path=path)
    else:
        registry.register(_ThisProcess())
    return registry


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: Prometheus text format. With ``AGENTS_METRICS_TOKEN`` set, only
    for ``Authorization: Bearer <token>``."""
    token = settings.METRICS_TOKEN
    if token and not constant_time_compare(
        request.headers.get("Authorization", ""), f"Bearer {token}"
    ):
        return HttpResponse("metrics need a bearer token\n", status=401, content_type="text/plain")
    registry = step_metrics_registry()
    registry.register(RuntimeCollector())
    # The format the scraper asks for (OpenMetrics, text 1.0), else the classic text 0.0.4.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(registry), content_type=content_type)


class ServeWorkerMetrics(bootsteps.StartStopStep):
    """A worker serves its step metrics on ``AGENTS_METRICS_PORT`` (0: it does not).

    With the prefork pool the steps run in child processes: without
    ``PROMETHEUS_MULTIPROC_DIR`` their metrics are invisible here, and this says so.
    """

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.server: Any = None

    def start(self, worker: Any) -> None:
        port = settings.METRICS_PORT
        if not port:
            return
        if not os.environ.get(MULTIPROC_DIR_ENV):
            logger.warning(
                "PROMETHEUS_MULTIPROC_DIR is not set: steps run in pool processes and "
                "their metrics will not be served",
                port=port,
            )
        self.server, _ = start_http_server(port, registry=step_metrics_registry())
        logger.info("worker metrics served", port=port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
