"""Issue 24: the ``agents_tasks`` gauges of ``/metrics`` do not count the whole table on
a large one: active statuses are counted (an index range), finished ones come from the
planner's statistics, and both follow tasks as they change status."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents import metrics
from tests.agents_project.test_metrics import scrape, value
from tests.api.factories import completed, dead_lettered, started

pytestmark = pytest.mark.django_db(transaction=True)


def analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE agents_agenttask")


def gauge(client, status: str) -> float:
    return value(scrape(client), "agents_tasks", status=status)


def test_gauges_follow_transitions_exactly_on_a_small_table(client, user):
    assert gauge(client, "completed") == 0
    completed(user)
    started(user)
    assert gauge(client, "completed") == 1
    assert gauge(client, "pending") == 1


def test_on_a_large_table_finished_statuses_are_estimated_and_active_ones_counted(
    client, user, monkeypatch
):
    monkeypatch.setattr(metrics, "EXACT_UP_TO", 0)  # this table counts as large
    completed(user)
    completed(user)
    dead_lettered(user)
    analyze()
    assert gauge(client, "completed") == 2
    assert gauge(client, "dead_lettered") == 1
    # A finished task shows once the statistics catch up (autovacuum's ANALYZE) ...
    completed(user)
    assert gauge(client, "completed") == 2
    analyze()
    assert gauge(client, "completed") == 3
    # ... an active one at once (active statuses are counted, not estimated).
    started(user)
    assert gauge(client, "pending") == 1
    assert gauge(client, "completed") == 3
    with CaptureQueriesContext(connection) as queries:
        metrics.tasks_by_status()
    grouped = [q["sql"] for q in queries.captured_queries if "GROUP BY" in q["sql"].upper()]
    # The only count reads the active statuses (the status index), not every task.
    assert len(grouped) == 1 and "IN (" in grouped[0], grouped
