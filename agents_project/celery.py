"""The Celery app: ``celery -A agents_project worker``, and what every process publishes
through.

Configured from Django settings (the ``CELERY_`` namespace). What a worker does besides
consuming (the dead-letter topology, the scheduler thread, bounded graceful shutdown,
health and metrics servers) is in ``agents.worker``, added here by name.
"""

from __future__ import annotations

import contextlib
import os

import structlog
from celery import Celery, signals

from agents_project import broker  # noqa: F401  (registers the embedded transport)
from agents_project.tracing import tracing_flush, tracing_setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agents_project.settings")

logger = structlog.get_logger(__name__)

app = Celery("agents_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _broker_sockets_closed_in_child() -> None:
    """In a forked child, close this process's copies of the sockets of the app's broker
    connection pool, without touching the connections (``os.register_at_fork``).

    kombu closes the pool's connections in every child a billiard pool process starts
    (``ConnectionPool`` registers ``force_close_all`` to run after a fork), and py-amqp
    closes a connection with ``shutdown(SHUT_RDWR)``, which ends it for every process
    sharing the socket: the parent's too. In a worker, the main process's scheduler then
    found its pooled connection reset at each new pool process, and a publish at that
    instant failed and was sent again. Closing the child's descriptor first leaves the
    parent's connection alone (``close(2)`` only drops this process's reference), and
    kombu's cleanup then finds a closed socket (its errors are ignored). The same fault
    and fix in redis-py: redis/redis-py#863.
    """
    pool = app._pool  # Celery's broker connection pool, if this process made one
    if pool is None:
        return
    for conn in [*pool._dirty, *pool._resource.queue]:
        transport = getattr(getattr(conn, "_connection", None), "transport", None)
        sock = getattr(transport, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


os.register_at_fork(after_in_child=_broker_sockets_closed_in_child)

# Traces, when the OTEL_* variables ask for them (every process imports this module; the
# SDK's batch processor starts again in each forked pool process by itself).
tracing_setup()


@signals.worker_process_shutdown.connect
def _spans_flushed(**_: object) -> None:
    # A pool process may end without running atexit handlers: export its spans first.
    tracing_flush()


# The worker's own bootsteps (``agents.worker``), named by dotted path as Celery names its
# built-in ones (``celery.worker.components:Pool``): this module, which every process
# that publishes imports, stays free of the apps.
app.steps["worker"].update(
    {
        "agents.worker:DeclareDeadLetterTopology",
        "agents.worker:PromptLostProcessCheck",
        "agents.worker:RunScheduler",
        "agents.worker:RunRetention",
        "agents.worker:ServeWorkerHealth",
        "agents.worker:ServeWorkerMetrics",
    }
)
