"""The step engine, driven in-process against the real database and the real queue."""

from __future__ import annotations

import pytest

from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent, DeadLetter
from tests.helpers import run_until_idle
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)


def start(user, *script, **kwargs):
    task, _ = task_start(owner=user, agent="scripted", input={"script": list(script)}, **kwargs)
    return task


def events(task):
    return list(AuditEvent.objects.filter(task=task).order_by("seq"))


def test_a_scripted_task_runs_to_completion_with_a_checkpoint_per_step(user):
    task = start(
        user,
        {"think": "plan"},
        {"tool": "calc", "args": {"expression": "6 * 7"}},
        {"tool": "ledger.append", "args": {"key": "k", "value": 1}},
        {"final": "done"},
    )
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == "done"
    assert list(task.checkpoints.values_list("step", flat=True)) == [0, 1, 2, 3, 4]
    calc = Checkpoint.objects.get(task=task, step=2).observations["tool_results"][0]
    assert calc["value"] == 42
    trail = events(task)
    assert [e.seq for e in trail] == list(range(1, len(trail) + 1))
    types = [e.type for e in trail]
    assert types == [
        "created",
        "transition",
        "reasoning",
        "step",
        "tool_call",
        "tool_result",
        "step",
        "tool_call",
        "tool_result",
        "step",
        "step",
        "transition",
    ]
    assert trail[1].payload == {"from": "pending", "to": "running"}
    assert trail[-1].payload == {"from": "running", "to": "completed"}
    ledger_call = trail[7].payload
    assert ledger_call["idempotency_key"] == f"{task.pk}:3:0"


def test_a_duplicate_delivery_of_a_committed_step_is_dropped(user):
    task = start(user, {"tool": "ledger.append", "args": {"key": "k", "value": 1}}, {"final": 1})
    run_until_idle()
    assert step_execute(task_id=task.pk, step=1) == StepResult.STALE
    assert step_execute(task_id=task.pk, step=2) == StepResult.STALE
    assert Checkpoint.objects.filter(task=task).count() == 3
    assert LedgerEntry.objects.filter(task=task).count() == 1


def test_a_step_run_twice_before_commit_keeps_one_checkpoint_and_one_side_effect(user):
    task = start(user, {"tool": "ledger.append", "args": {"key": "k", "value": 1}}, {"final": 1})
    # Two deliveries of step 1 both execute; the first commits, the second is dropped.
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    task.refresh_from_db()
    assert task.current_step == 2
    assert step_execute(task_id=task.pk, step=1) == StepResult.STALE
    assert LedgerEntry.objects.filter(task=task).count() == 1
    assert Checkpoint.objects.filter(task=task, step=1).count() == 1


def test_fail_with_times_is_retried_and_every_attempt_is_audited(user, fast_retries):
    task = start(user, {"fail": "flaky", "times": 2}, {"final": "ok"})
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    failures = [e for e in events(task) if e.type == "step_failed"]
    assert [f.payload["attempt"] for f in failures] == [1, 2]
    assert all(f.payload["retry_in_seconds"] >= 0 for f in failures)


def test_fail_without_times_dead_letters_after_the_last_retry(user, settings, fast_retries):
    settings.AGENTS = {**settings.AGENTS, "MAX_RETRIES": 2}
    task = start(user, {"think": "x"}, {"fail": "always broken"})
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.DEAD_LETTERED
    letter = DeadLetter.objects.get(task=task)
    assert letter.reason == DeadLetter.Reason.RETRIES_EXHAUSTED
    assert letter.step == 2
    assert letter.attempts == 3
    assert "always broken" in letter.error
    assert "RetryableError" in letter.traceback
    assert letter.message["args"] == [str(task.pk), 2]


def test_a_permanent_error_fails_the_task_at_once(user):
    task = start(user, {"fail": "no such account", "permanent": True})
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    assert task.error == "no such account"
    assert not DeadLetter.objects.filter(task=task).exists()


def test_a_bad_tool_call_fails_the_step_naming_the_field(user):
    task = start(user, {"tool": "calc", "args": {"expression": 7}})
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    assert "args.expression" in task.error


def test_unknown_task_and_stale_step_are_dropped(user):
    task = start(user, {"final": 1})
    assert step_execute(task_id=task.pk, step=5) == StepResult.STALE
    run_until_idle()
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED
