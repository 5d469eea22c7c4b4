"""``POST /api/tasks/batch/`` (``agents.services.tasks_start``): many tasks of one agent in
one transaction, every one as ``POST /api/tasks/`` would make it, at a constant number
of SQL statements; a bad input refuses the whole batch, naming it."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.models import AgentTask, Checkpoint, TaskStatus
from audit.models import AuditEvent
from audit.services import audit_verify
from tests.api.factories import SIMPLE
from tests.helpers import queue_depth, run_until_idle


def _batch(api, inputs):
    return api.post("/api/tasks/batch/", {"agent": "scripted", "inputs": inputs}, format="json")


def test_a_batch_makes_each_task_as_one_create_would_and_each_runs(api, user):
    inputs = [{"script": [{"think": str(i)}, {"final": i}]} for i in range(5)]
    response = _batch(api, inputs)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert [task["input"] for task in body] == inputs
    assert {task["status"] for task in body} == {"pending"}
    assert body[0]["usage"]["model_calls"] == 0
    tasks = AgentTask.objects.filter(pk__in=[t["id"] for t in body])
    assert tasks.count() == 5
    assert {(t.owner_id, t.in_flight, t.audit_seq) for t in tasks} == {(user.pk, 1, 1)}
    assert Checkpoint.objects.filter(task__in=tasks, step=0).count() == 5
    assert AuditEvent.objects.filter(task__in=tasks, type="created", seq=1).count() == 5
    assert queue_depth() == 5
    report = audit_verify(tasks=[(t.pk, t.audit_seq) for t in tasks])
    assert report.breaks == [] and report.verified == 5
    run_until_idle()
    ids = [t.pk for t in tasks]
    results = dict(AgentTask.objects.filter(pk__in=ids).values_list("pk", "result"))
    assert {t.status for t in AgentTask.objects.filter(pk__in=results)} == {TaskStatus.COMPLETED}
    assert sorted(results.values()) == list(range(5))


def test_a_batch_costs_the_same_statements_for_ten_tasks_as_for_a_hundred(api):
    def statements(count: int) -> int:
        with CaptureQueriesContext(connection) as queries:
            assert _batch(api, [SIMPLE] * count).status_code == 201
        return len(queries.captured_queries)

    statements(1)  # warm: the version intake's first read, the user's token
    assert statements(10) == statements(100)
    assert AgentTask.objects.count() == 111


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([SIMPLE, {"script": "not a list"}], "inputs[1].script"),
        ([SIMPLE, "text"], "inputs[1]"),
        ([], "inputs"),
        ([SIMPLE] * 1001, "inputs"),
    ],
)
def test_one_bad_input_refuses_the_batch_naming_it_and_writes_nothing(api, inputs, field):
    response = _batch(api, inputs)
    assert response.status_code == 400, response.json()
    assert response.json()["field"] == field
    assert AgentTask.objects.count() == 0
    assert AuditEvent.objects.count() == 0
    assert queue_depth() == 0
