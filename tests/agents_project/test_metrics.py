"""GET /metrics: Prometheus text with the numbers RUNBOOK.md's checklist watches."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.models import TaskStatus
from agents_project.celery import app
from agents_project.topology import dead_letter_queue
from tests.api.factories import completed, dead_lettered, run, started, waiting_for_approval
from tests.helpers import queue_depth, wait_until
from tools import breakers

pytestmark = pytest.mark.django_db(transaction=True)

BAD_TOOL_CALL = {"script": [{"tool": "calc", "args": {"expression": "1 +"}}]}


def scrape(client, **headers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_tasks_by_status_suspended_dead_letters_and_queue_depths(client, settings, user):
    before = scrape(client)
    completed(user)
    waiting_for_approval(user)
    dead_lettered(user)
    started(user)
    wait_until(lambda: queue_depth(dead_letter_queue(settings.AGENTS)) == 1)
    samples = scrape(client)

    counts = {s: value(samples, "agents_tasks", status=s) for s in TaskStatus.values}
    assert counts == {
        **dict.fromkeys(TaskStatus.values, 0.0),
        "completed": 1.0,
        "suspended": 1.0,
        "dead_lettered": 1.0,
        "pending": 1.0,
    }
    assert value(samples, "agents_tasks_suspended", kind="approval") == 1
    assert value(samples, "agents_tasks_suspended", kind="event") == 0
    assert value(samples, "agents_dead_letters_open") == 1
    assert value(samples, "agents_tasks_oldest_progress_seconds", status="pending") >= 0
    work, dead = settings.AGENTS["QUEUE"], settings.AGENTS["DEAD_LETTER_QUEUE"]
    assert value(samples, "agents_queue_messages", queue=work, role="work") == 1
    assert value(samples, "agents_queue_messages", queue=dead, role="dead_letter") == 1
    assert value(samples, "agents_queue_consumers", queue=work, role="work") == 0
    for source in ("database", "broker", "breakers"):
        assert value(samples, "agents_metrics_source_up", source=source) == 1

    # Steps ran in this process (tests.helpers.run_until_idle): its own histogram.
    runs = "agents_step_duration_seconds_count"
    assert (
        value(samples, runs, agent="scripted") - before.get((runs, (("agent", "scripted"),)), 0)
        >= 6
    )


def test_failures_are_counted_by_agent_and_tool(client, user):
    def failures(samples, tool: str) -> float:
        return samples.get(
            ("agents_step_failures_total", (("agent", "scripted"), ("tool", tool))), 0.0
        )

    before = scrape(client)
    run(user, BAD_TOOL_CALL, TaskStatus.FAILED)
    dead_lettered(user)
    after = scrape(client)
    assert failures(after, "calc") - failures(before, "calc") == 1
    assert failures(after, "none") - failures(before, "none") == 1


def test_breaker_states(client):
    breakers.force_open("metrics-test", actor="test")
    try:
        samples = scrape(client)
    finally:
        breakers.force_close("metrics-test", actor="test")
    state = "agents_circuit_breaker_state"
    assert value(samples, state, breaker="metrics-test", state="open") == 1
    assert value(samples, state, breaker="metrics-test", state="closed") == 0
    closed = scrape(client)
    assert value(closed, state, breaker="metrics-test", state="closed") == 1


@pytest.fixture
def broker_down():
    original = app.conf.broker_read_url
    app.conf.broker_read_url = "amqp://guest:guest@127.0.0.1:1//"
    yield
    app.conf.broker_read_url = original


def test_an_unreachable_broker_is_reported_and_the_rest_still_served(client, broker_down):
    samples = scrape(client)
    assert value(samples, "agents_metrics_source_up", source="broker") == 0
    assert value(samples, "agents_metrics_source_up", source="database") == 1
    assert ("agents_tasks", (("status", "pending"),)) in samples
    assert not any(name == "agents_queue_messages" for name, _ in samples)


def test_a_metrics_token_is_required_when_configured(client, settings):
    settings.METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    scrape(client, HTTP_AUTHORIZATION="Bearer s3cret")
