"""A worker observes each step's time in queue (publish to start) and its finished
tasks, and serves them with its step metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from tests.api.factories import SIMPLE
from tests.helpers import wait_until
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

QUEUED = ("agents_step_queue_seconds_count", (("agent", "scripted"),))
FINISHED = ("agents_tasks_finished_total", (("agent", "scripted"), ("status", "completed")))


def test_a_worker_serves_time_in_queue_and_finished_tasks(workers, user, tmp_path):
    port = free_port()
    workers.start(
        concurrency=2,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        AGENTS_METRICS_PORT=str(port),
    )
    ids = [task_start(owner=user, agent="scripted", input=SIMPLE)[0].pk for _ in range(2)]
    wait_until(
        lambda: AgentTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 2,
        timeout=60,
    )

    def scraped() -> dict | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.TransportError:
            return None
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return found if found.get(QUEUED) == 6 else None

    # Three steps for each task, each published once and started once.
    metrics = wait_until(scraped, timeout=30)
    assert metrics[FINISHED] == 2
