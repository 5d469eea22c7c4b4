"""Time limits on real workers: soft and hard step limits, and the task deadline."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent, DeadLetter
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

LIMITS = {
    "AGENTS_MODULES": "tests.integration.agents_for_tests",
    "AGENTS_STEP_SOFT_TIME_LIMIT": "1",
    "AGENTS_STEP_TIME_LIMIT": "2",
    "AGENTS_MAX_RETRIES": "1",
    "AGENTS_RETRY_BACKOFF": "0.05",
}


@pytest.fixture
def limits(settings) -> dict[str, str]:
    """The same limits here (where step 1 is published) and in the worker."""
    settings.AGENTS = {
        **settings.AGENTS,
        "STEP_SOFT_TIME_LIMIT": 1.0,
        "STEP_TIME_LIMIT": 2.0,
        "MAX_RETRIES": 1,
        "RETRY_BACKOFF": 0.05,
    }
    return LIMITS


def _status(task_id) -> str:
    return AgentTask.objects.get(pk=task_id).status


def test_on_the_soft_limit_a_step_can_keep_what_it_has(workers, user, limits):
    from tests.integration import agents_for_tests  # noqa: F401  (registers "careful" here)

    workers.start(concurrency=1, **limits)
    task, _ = task_start(owner=user, agent="careful", input={})
    wait_until(lambda: _status(task.pk) == TaskStatus.COMPLETED, timeout=30)
    state = Checkpoint.objects.get(task=task, step=1).state
    assert state["cut_short"] is True
    assert 5 <= state["done"] < 100


def test_a_step_over_its_soft_limit_is_retried_then_dead_lettered(workers, user, limits):
    workers.start(concurrency=1, **limits)
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"sleep": 30}]})
    wait_until(lambda: _status(task.pk) == TaskStatus.DEAD_LETTERED, timeout=30)
    letter = DeadLetter.objects.get(task=task)
    assert "SoftTimeLimitExceeded" in letter.error
    assert letter.attempts == 2


def test_a_step_over_its_hard_limit_is_killed_and_does_not_loop_forever(workers, user, limits):
    from tests.integration import agents_for_tests  # noqa: F401

    workers.start(concurrency=1, **limits)
    task, _ = task_start(owner=user, agent="stubborn", input={})
    wait_until(lambda: _status(task.pk) == TaskStatus.DEAD_LETTERED, timeout=60)
    letter = DeadLetter.objects.get(task=task)
    assert letter.reason == DeadLetter.Reason.WORKER_LOST
    assert AuditEvent.objects.filter(task=task, type="worker_lost").count() == letter.attempts


@pytest.mark.parametrize(
    "script",
    [
        [{"sleep": 30}],  # running, inside a step
        [{"wait": 60}],  # suspended on a timer
        [{"approval": "nobody will answer"}],  # suspended, waiting for a person
    ],
    ids=["running", "timer", "approval"],
)
def test_a_task_never_outlives_its_deadline(workers, user, script):
    workers.start(concurrency=1)
    task, _ = task_start(owner=user, agent="scripted", input={"script": script}, timeout_seconds=2)
    wait_until(lambda: _status(task.pk) == TaskStatus.TIMED_OUT, timeout=30)
    task.refresh_from_db()
    overrun = (task.finished_at - task.deadline).total_seconds()
    print(f"{script[0]}: ended {overrun:.2f} s after its deadline")
    assert overrun >= 0
    assert "deadline" in task.error


def test_a_queued_task_times_out_with_no_worker_at_all(user, settings):
    import time

    from agents.core.scheduler import tick

    task, _ = task_start(
        owner=user, agent="scripted", input={"script": [{"final": 1}]}, timeout_seconds=0.5
    )
    time.sleep(0.6)
    tick(actor="scheduler:test")
    assert _status(task.pk) == TaskStatus.TIMED_OUT
