"""Worker processes export their step metrics (prometheus-client's multiprocess mode):
on the worker's own port, and to the web's /metrics on the same host."""

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

BAD_TOOL_CALL = {"script": [{"think": "try"}, {"tool": "calc", "args": {"expression": "1 +"}}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


STEPS = ("agents_step_duration_seconds_count", (("agent", "scripted"),))
CALC_FAILURES = ("agents_step_failures_total", (("agent", "scripted"), ("tool", "calc")))


def test_a_worker_serves_its_pool_processes_step_metrics(
    workers, user, tmp_path, client, monkeypatch
):
    port = free_port()
    directory = tmp_path / "prometheus"
    workers.start(
        concurrency=2, PROMETHEUS_MULTIPROC_DIR=str(directory), AGENTS_METRICS_PORT=str(port)
    )
    ids = [task_start(owner=user, agent="scripted", input=SIMPLE)[0].pk for _ in range(3)]
    ids.append(task_start(owner=user, agent="scripted", input=BAD_TOOL_CALL)[0].pk)

    def ended() -> bool:
        statuses = list(AgentTask.objects.filter(pk__in=ids).values_list("status", flat=True))
        return statuses.count(TaskStatus.COMPLETED) == 3 and TaskStatus.FAILED in statuses

    wait_until(ended, timeout=60)

    def scraped() -> dict | None:
        try:
            found = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        except httpx.TransportError:
            return None
        return found if found.get(STEPS) == 10 else None

    # Three steps for each of three tasks, and the failed task's first step.
    worker = wait_until(scraped, timeout=30)
    assert worker[CALC_FAILURES] == 1
    assert (
        worker[("agents_step_duration_seconds_bucket", (("agent", "scripted"), ("le", "+Inf")))]
        == 10
    )

    # A web process on the same host, given the same directory, serves them too.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    web = samples(client.get("/metrics").content.decode())
    assert web[STEPS] == 10 and web[CALC_FAILURES] == 1
    assert ("agents_tasks", (("status", "completed"),)) in web
