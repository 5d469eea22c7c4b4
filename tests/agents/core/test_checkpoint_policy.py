"""The checkpoint policy: several cheap steps in one delivery, committed in groups."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def policy(settings):
    def set_policy(per_delivery: int, commit_every: int) -> None:
        settings.AGENTS = {
            **settings.AGENTS,
            "CHECKPOINT_POLICY": {
                "scripted": {"steps_per_delivery": per_delivery, "commit_every": commit_every}
            },
        }

    return set_policy


def start(user, script):
    return task_start(owner=user, agent="scripted", input={"script": script})[0]


def checkpoints(task):
    return list(
        Checkpoint.objects.filter(task=task).order_by("step").values_list("step", flat=True)
    )


def test_the_default_is_one_step_per_delivery(user):
    task = start(user, [{"think": "a"}, {"think": "b"}, {"final": 1}])
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    assert checkpoints(task) == [0, 1]


def test_a_whole_run_of_cheap_steps_in_one_delivery_and_one_transaction(user, policy):
    policy(100, 100)
    task = start(user, [{"think": str(i)} for i in range(20)] + [{"final": "ok"}])
    with CaptureQueriesContext(connection) as queries:
        assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert checkpoints(task) == list(range(22)), "one checkpoint per step, as always"
    commits = [q for q in queries.captured_queries if q["sql"].upper().startswith("COMMIT")]
    assert len(commits) <= 3, "the steps share one commit (plus pending -> running)"
    steps = AuditEvent.objects.filter(task=task, type="step").values_list("step", flat=True)
    assert list(steps) == list(range(1, 22))


def test_commit_every_k_steps_then_a_failure_is_recorded_after_them(user, policy):
    policy(10, 2)
    task = start(user, [{"think": "a"}, {"think": "b"}, {"think": "c"}, {"fail": "no"}])
    assert step_execute(task_id=task.pk, step=1) == StepResult.RETRY
    task.refresh_from_db()
    assert checkpoints(task) == [0, 1, 2, 3], "steps before the failure are kept"
    assert (task.current_step, task.attempt, task.lease_owner) == (4, 1, "")
    failure = AuditEvent.objects.get(task=task, type="step_failed")
    assert failure.step == 4


def test_a_step_that_calls_tools_ends_the_delivery(user, policy):
    policy(10, 10)
    script = [
        {"think": "a"},
        {"tool": "ledger.append", "args": {"key": "k", "value": 1}},
        {"think": "b"},
        {"final": 1},
    ]
    task = start(user, script)
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    task.refresh_from_db()
    assert task.current_step == 3, "steps 1 and 2 ran; the tool step ended the run"
    assert task.in_flight == 1, "step 3 is published"
    assert LedgerEntry.objects.filter(task=task).count() == 1
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.RUNNING
