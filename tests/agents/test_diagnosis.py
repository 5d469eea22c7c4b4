"""agents.diagnosis: why a task is where it is, for each state an operator meets."""

from __future__ import annotations

import pytest

from agents.diagnosis import task_diagnosis, task_error_text, task_step_durations
from agents.models import TaskStatus
from tests.api.factories import completed, dead_lettered, started, waiting_for_approval
from tests.console import BREAKER_NAME, held_open, retrying, waiting_on_breaker

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_dead_lettered_task_says_its_error_and_that_an_operator_must_act(user):
    task, letter = dead_lettered(user)
    d = task_diagnosis(task)
    assert "upstream is down" in task.error  # the dead letter sets it on the row
    assert d["status"] == TaskStatus.DEAD_LETTERED
    assert d["summary"] == "Dead-lettered: RetryableError: upstream is down"
    assert d["last_error"]["message"] == letter.error == "RetryableError: upstream is down"
    assert d["last_error"]["type"] == "dead_lettered" and d["last_error"]["step"] == 2
    assert d["waiting_on"]["kind"] == "operator"
    assert task_error_text(task) == "RetryableError: upstream is down"


def test_a_suspended_task_says_what_it_waits_for_and_since_when(user):
    task = waiting_for_approval(user)
    d = task_diagnosis(task)
    assert d["waiting_on"]["kind"] == "approval"
    assert d["waiting_on"]["detail"] == "approval: Refund 42?"
    assert d["waiting_on"]["since"] is not None and d["waiting_on"]["until"] is None
    assert d["summary"] == "Waiting for a person's approval: Refund 42?"
    assert d["last_error"] is None and d["open_breaker"] is None


def test_a_task_behind_an_open_breaker_names_the_breaker_and_its_retry(user):
    with held_open():
        task = waiting_on_breaker(user)
        d = task_diagnosis(task)
    assert d["status"] == TaskStatus.RUNNING
    assert d["waiting_on"]["kind"] == "breaker"
    assert d["open_breaker"]["name"] == BREAKER_NAME
    assert d["open_breaker"]["state"] == "open" and d["open_breaker"]["forced"] is True
    assert d["next_retry_at"] == task.retry_at == d["waiting_on"]["until"]
    assert d["attempt"] == 0, "an open breaker spends no attempt"
    assert f"circuit breaker '{BREAKER_NAME}'" in d["summary"]
    assert d["last_error"]["type"] == "CircuitOpen"


def test_a_retrying_task_gives_its_error_attempt_and_retry_time(user):
    task = retrying(user)
    d = task_diagnosis(task)
    assert d["waiting_on"]["kind"] == "retry"
    assert d["last_error"]["message"] == "flaky upstream"
    assert d["last_error"]["type"] == "RetryableError"
    assert d["attempt"] == 1 and d["next_retry_at"] == task.retry_at
    assert d["open_breaker"] is None
    assert d["summary"].startswith("Retrying after an error: attempt 2 of step 2 at ")


def test_an_ended_task_waits_for_nothing_and_a_deadline_is_counted_down(user):
    done = completed(user)
    assert task_diagnosis(done)["waiting_on"] is None
    assert task_diagnosis(done)["summary"] == "Completed."
    pending = started(user, timeout_seconds=600)
    d = task_diagnosis(pending)
    assert d["waiting_on"]["kind"] == "worker"
    assert d["deadline"] == pending.deadline
    assert 0 < d["deadline_in_seconds"] <= 600


def test_step_durations_come_from_the_step_events(user):
    task = completed(user)
    rows = task_step_durations(task)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["outcome"] for r in rows] == ["continue", "call_tools", "finish"]
    assert all(r["duration_ms"] >= 0 for r in rows)
    assert rows[0]["waited_ms"] is None and rows[1]["waited_ms"] >= 0
