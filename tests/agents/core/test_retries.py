"""Retries, backoff, the lost-publish sweep, and timers, driven in-process."""

from __future__ import annotations

import pytest

from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.core.retries import backoff_delay
from agents.core.scheduler import stuck_tasks_republish
from agents.errors import RetryLater
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent, DeadLetter
from tests.helpers import publishes_refused, queue_depth, run_until_idle
from tools.registry import Arg, tool

pytestmark = pytest.mark.django_db(transaction=True)

calls = {"fragile": 0, "waiting": 0}


@tool("test.fragile", args={}, max_retries=1, replace=True)
def fragile(ctx, args):
    """Always fails: its own budget is one retry, whatever the agent allows."""
    calls["fragile"] += 1
    raise ConnectionError("the upstream hung up")


@tool("test.waiting", args={"until": Arg(int)}, replace=True)
def waiting(ctx, args):
    """Asks to be retried later (as an open breaker does) until called ``until`` times."""
    calls["waiting"] += 1
    if calls["waiting"] < args["until"]:
        raise RetryLater("not yet", delay=0.01)
    return calls["waiting"]


def start(user, *script):
    return task_start(owner=user, agent="scripted", input={"script": list(script)})[0]


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling(settings):
    settings.AGENTS = {**settings.AGENTS, "RETRY_BACKOFF": 1.0, "RETRY_BACKOFF_MAX": 30.0}
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (6, 30), (20, 30)]:
        delays = [backoff_delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d, 6) for d in delays}) > 150, "jittered"


def test_a_tools_own_retry_budget_caps_the_agents(user, fast_retries):
    calls["fragile"] = 0
    task = start(user, {"tool": "test.fragile"})
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.DEAD_LETTERED
    assert calls["fragile"] == 2, "one call and one retry, not the agent's five"
    letter = DeadLetter.objects.get(task=task)
    assert "the upstream hung up" in letter.error


def test_retry_later_waits_without_spending_attempts(user, settings):
    settings.AGENTS = {**settings.AGENTS, "MAX_RETRIES": 1}
    calls["waiting"] = 0
    task = start(user, {"tool": "test.waiting", "args": {"until": 5}}, {"final": "ok"})
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED, "four waits, yet a budget of one retry"
    waits = AuditEvent.objects.filter(task=task, type="step_failed")
    assert waits.count() == 4
    assert {w.payload["attempt"] for w in waits} == {0}


def test_a_retry_is_a_timer_in_the_database_not_a_broker_delay(user, settings):
    settings.AGENTS = {**settings.AGENTS, "RETRY_BACKOFF": 60.0, "RETRY_BACKOFF_MAX": 60.0}
    task = start(user, {"fail": "later", "times": 1}, {"final": "ok"})
    assert step_execute(task_id=task.pk, step=1) == StepResult.RETRY
    retry_at = AgentTask.objects.get(pk=task.pk).retry_at
    assert 30 <= (retry_at - task.created_at).total_seconds() <= 61
    # Step 1's original message is still queued: as an early duplicate it is dropped,
    # and nothing runs before the backoff has passed.
    run_until_idle(wait_for_retries=False)
    assert queue_depth() == 0
    assert AgentTask.objects.get(pk=task.pk).current_step == 1
    AgentTask.objects.filter(pk=task.pk).update(retry_at=retry_at.replace(year=2000))
    run_until_idle()
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED


def test_a_lost_publish_is_found_and_resumed_by_the_sweep(user):
    task = start(user, {"think": "a"}, {"final": "b"})
    with publishes_refused():
        # Step 1 runs and commits, but publishing step 2 fails: the broker is gone.
        run_until_idle(max_messages=1)
    task.refresh_from_db()
    assert (task.status, task.current_step) == (TaskStatus.RUNNING, 2)
    assert queue_depth() == 0, "no message anywhere"
    assert task.in_flight == 0, "the refused publish is not counted as queued"
    # No wait: the sweep acts on "no live copy and no message", never on elapsed time.
    assert stuck_tasks_republish(actor="test") == 1
    assert stuck_tasks_republish(actor="test") == 0, "its message is now queued"
    assert queue_depth() == 1
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    republished = AuditEvent.objects.get(task=task, type="republished")
    assert republished.step == 2
