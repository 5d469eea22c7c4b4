"""Prometheus plumbing: multiprocess values, fork safety, scrape-time sources, ``/metrics``.

The numbers themselves live with the app they describe: ``agents.metrics`` (steps,
tasks, the runtime's tables), ``llm.metrics`` (model calls), ``tools.metrics`` (circuit
breakers); the broker's queue depths are read here (``queue_metrics``).

- **Observed where things happen** (counters and histograms). A Celery prefork worker
  runs steps in child processes and gunicorn serves from several, so these use
  prometheus-client's multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty
  directory before the process starts, and every child writes its values there. HTTP
  requests of the web process are counted by django-prometheus (``django_http_*``).
- **Read when Prometheus scrapes**, from the truth rather than from counters that could
  drift: the sources named in ``AGENTS_METRICS_SOURCES`` (settings: name to the dotted
  path of a function returning metric families). Each source is read in its own thread
  within ``AGENTS_METRICS_SOURCE_TIMEOUT`` seconds (2): a source that is down or hangs is
  reported as ``agents_metrics_source_up{source} 0`` and the scrape still answers in
  time.

Where to scrape:

- ``GET /metrics`` on the web process: the scrape-time gauges, plus every worker's step
  metrics found in ``PROMETHEUS_MULTIPROC_DIR`` when the workers share this host and
  directory (without the directory: this process's own).
- ``AGENTS_METRICS_PORT`` on each worker (when its directory is its own, e.g. one per
  container): that worker's step metrics (``agents.worker.ServeWorkerMetrics``). Scrape
  one or the other, not both, or steps are counted twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import structlog
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.utils.crypto import constant_time_compare
from django.utils.module_loading import import_string
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from agents_project.celery import app
from agents_project.topology import dead_letter_queue

logger = structlog.get_logger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get(MULTIPROC_DIR_ENV):
    # prometheus-client writes there from the first observation; it must exist by then.
    os.makedirs(os.environ[MULTIPROC_DIR_ENV], exist_ok=True)

# The labelled metrics whose ``labels()`` lock a forked child gets renewed.
_RENEWED_AFTER_FORK: list[MetricWrapperBase] = []


def renew_after_fork(*wrappers: MetricWrapperBase) -> None:
    """Give each of ``wrappers`` (labelled metrics, used in pool processes) a free
    ``labels()`` lock in every process forked from this one: prometheus-client holds it
    while it makes a label set's value (opening its file, in multiprocess mode), which
    a thread of a worker's main process may be doing at the instant of a fork (the
    scheduler counting a timed-out task)."""
    _RENEWED_AFTER_FORK.extend(wrappers)


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


def _sources() -> list[tuple[str, Callable[[], Iterable[Metric]]]]:
    """``AGENTS_METRICS_SOURCES``, imported by dotted path (as Django names middleware)."""
    return [(name, import_string(path)) for name, path in settings.METRICS_SOURCES.items()]


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


def queue_metrics() -> Iterable[Metric]:
    """The work and dead-letter queues' ready messages and consumers (a passive
    ``queue_declare``: it creates nothing), and the work queue's length limit."""
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
