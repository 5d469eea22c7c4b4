"""The Celery app: ``celery -A agents_project worker``.

Configured from Django settings (the ``CELERY_`` namespace). A worker also:

- declares the dead-letter exchange and queue on RabbitMQ before it consumes;
- runs the scheduler (``agents.scheduler``) in a thread of its main process, so timers,
  retries, deadlines and the stuck-task sweep need no extra process to deploy.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, bootsteps

from agents_project import broker  # noqa: F401  (registers the embedded transport)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agents_project.settings")

app = Celery("agents_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class DeclareDeadLetterTopology(bootsteps.StartStopStep):
    """Declare the DLX and DLQ (the work queue declares itself when consumed)."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        from django.conf import settings

        from agents_project.topology import dead_letter_queue

        if not settings.BROKER_IS_AMQP:
            return
        with worker.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=10)
            dead_letter_queue(settings.AGENTS)(conn.default_channel).declare()


class RunScheduler(bootsteps.StartStopStep):
    """The runtime's clock, in a thread of the worker's main process."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.scheduler: Any = None

    def start(self, worker: Any) -> None:
        from django.conf import settings

        if settings.AGENTS["SCHEDULER_INTERVAL"] <= 0:
            return
        from agents.scheduler import Scheduler

        self.scheduler = Scheduler()
        self.scheduler.start()

    def stop(self, worker: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


app.steps["worker"].add(DeclareDeadLetterTopology)
app.steps["worker"].add(RunScheduler)
