"""GET /metrics: Prometheus text with the numbers RUNBOOK.md's checklist watches."""

from __future__ import annotations

import socket
import threading

import psycopg
import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from agents import metrics
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


def counted(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_tasks_created_and_finished_are_counted_by_agent_and_status(client, user):
    created, finished = "agents_tasks_created_total", "agents_tasks_finished_total"
    before = scrape(client)
    completed(user)
    completed(user)
    dead_lettered(user)
    waiting_for_approval(user)
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return counted(after, name, **labels) - counted(before, name, **labels)

    assert grew(created, agent="scripted") == 4
    assert grew(finished, agent="scripted", status="completed") == 2
    assert grew(finished, agent="scripted", status="dead_lettered") == 1
    assert grew(finished, agent="scripted", status="failed") == 0


def test_time_in_queue_and_step_durations_have_millisecond_buckets(client):
    before = scrape(client)
    metrics.step_started(agent="queue-test", queued_seconds=0.003)
    metrics.step_started(agent="queue-test", queued_seconds=42.0)
    metrics.step_committed(agent="queue-test", duration_ms=0.5)
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return counted(after, name, **labels) - counted(before, name, **labels)

    queued = "agents_step_queue_seconds_bucket"
    assert grew(queued, agent="queue-test", le="0.005") == 1
    assert grew(queued, agent="queue-test", le="60.0") == 2
    assert grew("agents_step_queue_seconds_count", agent="queue-test") == 2
    assert grew("agents_step_duration_seconds_bucket", agent="queue-test", le="0.001") == 1


def test_http_requests_are_counted_by_status(client):
    name = "django_http_responses_total_by_status_total"
    before = scrape(client)
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/no-such-thing/").status_code in (401, 404)
    after = scrape(client)
    # The scrape itself answered 200 too.
    assert counted(after, name, status="200") - counted(before, name, status="200") >= 2
    assert any(n == "django_http_requests_latency_seconds_by_view_method_count" for n, _ in after)


@pytest.fixture
def hanging_broker(settings):
    """A broker address that accepts connections and never says a word (a hung RabbitMQ,
    a half-open firewall): without a bound, a read from it never returns."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    original = app.conf.broker_read_url
    app.conf.broker_read_url = f"amqp://guest:guest@127.0.0.1:{server.getsockname()[1]}//"
    settings.METRICS_SOURCE_TIMEOUT = 0.5
    yield accepted
    app.conf.broker_read_url = original
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.timeout(60)
def test_a_hanging_broker_is_reported_down_and_the_scrape_still_answers(client, hanging_broker):
    samples = scrape(client)
    assert hanging_broker, "the scrape never reached the hanging broker"
    assert value(samples, "agents_metrics_source_up", source="broker") == 0
    assert value(samples, "agents_metrics_source_up", source="database") == 1
    assert ("agents_tasks", (("status", "pending"),)) in samples


@pytest.fixture
def dead_letters_locked(settings):
    """Another session holds an exclusive lock on the dead-letter table: every read of it
    waits for as long as the lock is held (a stuck migration, a runaway transaction)."""
    params = connection.get_connection_params()
    locker = psycopg.connect(**params, autocommit=False)
    locker.execute("LOCK TABLE audit_deadletter IN ACCESS EXCLUSIVE MODE")
    settings.METRICS_SOURCE_TIMEOUT = 0.5
    yield
    locker.rollback()
    locker.close()


def waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


@pytest.mark.timeout(60)
def test_a_hanging_database_read_is_cut_short_and_not_piled_up(client, dead_letters_locked):
    samples = scrape(client)
    assert value(samples, "agents_metrics_source_up", source="database") == 0
    assert value(samples, "agents_metrics_source_up", source="broker") == 1
    assert any(name == "agents_queue_messages" for name, _ in samples)
    # The read left hanging by the first scrape is not started again by the next ones.
    wait_until(lambda: waiting_on_locks() == 1)
    for _ in range(3):
        again = scrape(client)
        assert value(again, "agents_metrics_source_up", source="database") == 0
    assert waiting_on_locks() == 1
