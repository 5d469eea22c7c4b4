"""What a worker runs besides its steps: Celery bootsteps and the bounded warm shutdown.

``agents_project.celery`` adds these bootsteps to every worker by dotted name. A worker:

- declares the dead-letter exchange and queue on RabbitMQ before it consumes;
- runs the scheduler (``agents.core.scheduler``) in a thread of its main process, so
  timers, retries, deadlines and the stuck-task sweep need no extra process to deploy,
  and announces the agent versions it serves before it consumes;
- on SIGTERM, lets running steps finish within ``AGENTS_SHUTDOWN_GRACE`` seconds;
- serves ``/healthz`` and ``/readyz`` on ``AGENTS_WORKER_HEALTH_PORT`` when it is set
  (``tools.health``);
- serves its step metrics on ``AGENTS_METRICS_PORT`` when it is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

import structlog
from billiard.process import active_children
from celery import bootsteps, signals
from celery.worker.state import maybe_shutdown
from django.conf import settings
from prometheus_client import start_http_server

from agents.core.leases import leases_hand_back
from agents.core.scheduler import Scheduler
from agents.retention import RetentionLoop
from agents.schedules import schedules_fire
from agents.services import task_start
from agents_project.metrics import MULTIPROC_DIR_ENV, step_metrics_registry
from agents_project.topology import dead_letter_queue
from tools.health import WorkerHealthServer

logger = structlog.get_logger(__name__)


def _waiting_for_broker(exc: BaseException, interval: float) -> None:
    logger.warning("broker unreachable; waiting for it", error=repr(exc), retry_in=interval)


class DeclareDeadLetterTopology(bootsteps.StartStopStep):
    """Declare the DLX and DLQ (the work queue declares itself when consumed)."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        if not settings.BROKER_IS_AMQP:
            return
        with worker.app.connection_for_write() as conn:
            # Wait for the broker however long it takes (no "Unrecoverable error"),
            # and still honour a SIGTERM meanwhile (``maybe_shutdown``).
            conn.ensure_connection(
                errback=_waiting_for_broker,
                max_retries=None,
                interval_max=5,
                callback=maybe_shutdown,
            )
            dead_letter_queue(settings.AGENTS)(conn.default_channel).declare()


def scheduled_tasks_start(*, actor: str) -> int:
    """The scheduler's job that fires due schedules (``agents.schedules``)."""
    return schedules_fire(actor=actor, start=task_start)


class RunScheduler(bootsteps.StartStopStep):
    """The runtime's clock, in a thread of the worker's main process."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.scheduler: Any = None

    def start(self, worker: Any) -> None:
        if settings.AGENTS["SCHEDULER_INTERVAL"] <= 0:
            return
        self.scheduler = Scheduler(jobs={"schedules": scheduled_tasks_start})
        # Announce the versions this worker serves before it consumes (the consumer is
        # the worker's last bootstep): a task created from now on may be pinned to them.
        try:
            self.scheduler.announce()
        except Exception:
            # The database may be away: the scheduler's first tick announces instead.
            logger.exception("could not announce this worker's versions at start")
        self.scheduler.start()

    def stop(self, worker: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


class RunRetention(bootsteps.StartStopStep):
    """Retention and archival (``agents.retention``) every ``AGENTS_RETENTION["interval"]``
    seconds, in its own thread of the worker's main process: apart from the scheduler's,
    so that archiving a long task never delays a timer, a deadline or a sweep. Every
    worker runs it; runs at once take different tasks (``SKIP LOCKED``)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.loop: Any = None

    def start(self, worker: Any) -> None:
        if settings.AGENTS["RETENTION"].get("interval", 3600) <= 0:
            return
        self.loop = RetentionLoop()
        self.loop.start()

    def stop(self, worker: Any) -> None:
        if self.loop is not None:
            self.loop.stop()


class ServeWorkerHealth(bootsteps.StartStopStep):
    """``/healthz`` and ``/readyz`` on ``AGENTS_WORKER_HEALTH_PORT`` (0: off), from a
    thread of the worker's main process (``tools.health``)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.server: Any = None

    def start(self, worker: Any) -> None:
        port = settings.AGENTS["WORKER_HEALTH_PORT"]
        if port <= 0:
            return
        self.server = WorkerHealthServer(settings.AGENTS["WORKER_HEALTH_HOST"], port)
        self.server.start()

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.stop()


class PromptLostProcessCheck(bootsteps.StartStopStep):
    """Notice a killed pool process within half a second, not five.

    The prefork pool learns that a child died from the child's sentinel, but when that
    fires before the kernel has the exit status, the death is only found by the pool's
    own 5 s maintenance timer, and the step it held waits that long to be handed back.
    Checking every 0.5 s costs one non-blocking waitpid per pool process.
    """

    requires = {"celery.worker.components:Hub", "celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        maintain = getattr(getattr(worker.pool, "_pool", None), "maintain_pool", None)
        if worker.hub is not None and maintain is not None:
            worker.hub.call_repeatedly(0.5, maintain)


@signals.worker_shutting_down.connect
def _bound_the_warm_shutdown(sig: str, how: str, exitcode: int, **kwargs: Any) -> None:
    """SIGTERM (what Kubernetes and ``docker stop`` send) starts Celery's warm shutdown:
    take no more messages, let running steps finish, exit 0 as soon as they have. Left
    alone it would wait for a step however long it runs; after ``AGENTS_SHUTDOWN_GRACE``
    seconds it stops the steps still running, hands their leases back (so their
    redelivery starts at once and is not counted as a lost worker), and turns the
    shutdown into a cold one, which gives their messages back to the queue (nothing is
    lost: no checkpoint committed).

    Celery's own "soft shutdown" is not used: it always waits the whole timeout, even
    when the running steps finish at once.
    """
    if how != "Warm":
        return
    grace = settings.AGENTS["SHUTDOWN_GRACE"]
    node = str(kwargs.get("sender") or "")
    timer = threading.Timer(grace, _hand_back_and_stop, args=(node, os.getpid()))
    timer.daemon = True
    timer.start()


def _hand_back_and_stop(node: str, pid: int) -> None:
    """Stop the steps still running, hand their leases back, then shut down cold.

    The order keeps one live copy at a time: the pool processes are frozen (SIGSTOP)
    before their leases are released, and killed after, so no redelivered copy can
    start while this worker's copy still runs.
    """
    children = [child.pid for child in active_children() if child.pid]
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGSTOP)
    logging.getLogger(__name__).warning(
        "pool frozen for shutdown at %.6f: pids %s", time.time(), sorted(children)
    )
    try:
        if node:
            leases_hand_back(node=node)
    except Exception:  # the database may be away: the leases then expire on their own
        logging.getLogger(__name__).exception("could not hand the leases back")
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        os.kill(pid, signal.SIGQUIT)


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
