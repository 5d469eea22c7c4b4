"""The SQL statements of one ordinary step, counted: a regression in the hot path shows
up here as a failing count, not as a timing."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.core import clock
from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.services import task_start

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_ordinary_step_costs_six_statements(user):
    script = [{"think": "a"}, {"think": "b"}, {"think": "c"}, {"final": 1}]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED  # input cached
    clock.now()  # the clock's offset is measured at most every 10 s, not per step
    with CaptureQueriesContext(connection) as queries:
        assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    # Claim the lease and read the checkpoint and the audit chain's head (one UPDATE ...
    # RETURNING); then one transaction: advance the task, insert the checkpoint, insert
    # the audit events (sealed onto the head the claim read).
    assert statements == ["UPDATE", "BEGIN", "UPDATE", "INSERT", "INSERT", "COMMIT"], statements
