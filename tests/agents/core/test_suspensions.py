"""Suspend and resume: approvals, events, timers, wait timeouts, cancellation, races."""

from __future__ import annotations

import threading
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.core.suspensions import task_approve, task_cancel, task_signal
from agents.models import AgentTask, Checkpoint, Signal, Suspension, TaskStatus
from agents.services import task_start
from agents_project.errors import Conflict, NotFound
from audit.models import AuditEvent
from tests.helpers import queue_depth, run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def start(user, *script, **kwargs):
    return task_start(owner=user, agent="scripted", input={"script": list(script)}, **kwargs)[0]


def status(task) -> str:
    return AgentTask.objects.get(pk=task.pk).status


def types(task) -> list[str]:
    return list(AuditEvent.objects.filter(task=task).order_by("seq").values_list("type", flat=True))


def test_an_approval_suspends_without_a_message_and_resumes_with_the_decision(user):
    task = start(
        user,
        {"approval": "refund 10?"},
        {"tool": "ledger.append", "args": {"key": "refund", "value": 10}},
        {"final": "done"},
    )
    run_until_idle()
    assert status(task) == TaskStatus.SUSPENDED
    assert queue_depth() == 0, "a suspended task holds no message"
    wait = Suspension.objects.get(task=task)
    assert (wait.kind, wait.reason, wait.resolved_at) == ("approval", "refund 10?", None)

    task_approve(task_id=task.pk, user=user, approved=True, comment="fine")
    run_until_idle()
    assert status(task) == TaskStatus.COMPLETED
    wait.refresh_from_db()
    assert (wait.resolution, wait.decided_by, wait.comment) == ("approved", user, "fine")
    transitions = AuditEvent.objects.filter(task=task, type="transition").order_by("seq")
    resumed = [t.payload for t in transitions if t.payload.get("resumed")]
    assert resumed == [
        {"from": "suspended", "to": "running", "resumed": True, "reason": "approved"}
    ]
    with pytest.raises(Conflict):
        task_approve(task_id=task.pk, user=user, approved=True)


def test_a_rejection_fails_the_task_unless_the_agent_handles_it(user):
    plain = start(user, {"approval": "ok?"}, {"final": "no"})
    handled = start(user, {"approval": "ok?", "on_reject": "continue"}, {"final": "handled"})
    run_until_idle()
    task_approve(task_id=plain.pk, user=user, approved=False, comment="too expensive")
    task_approve(task_id=handled.pk, user=user, approved=False)
    run_until_idle()
    plain.refresh_from_db()
    assert plain.status == TaskStatus.FAILED and "too expensive" in plain.error
    assert status(handled) == TaskStatus.COMPLETED
    assert Suspension.objects.get(task=handled).resolution == "rejected"


def test_the_decision_is_visible_to_the_next_step(user):
    from agents.definition import _REGISTRY, Agent, Finish, Suspend, register

    class Asker(Agent):
        name = "asker"

        def step(self, ctx):
            if ctx.resumed is None:
                return Suspend(state={}, approval="go?", on_reject="continue")
            r = ctx.resumed
            return Finish(result=[r.kind, r.approved, r.comment, r.decided_by])

    register(Asker)
    try:
        task, _ = task_start(owner=user, agent="asker", input={})
        run_until_idle()
        task_approve(task_id=task.pk, user=user, approved=False, comment="not today")
        run_until_idle()
        assert AgentTask.objects.get(pk=task.pk).result == ["approval", False, "not today", "alice"]
    finally:
        _REGISTRY.pop("asker")


def test_another_users_task_cannot_be_approved_or_seen(user, other_user):
    task = start(user, {"approval": "?"})
    run_until_idle()
    with pytest.raises(NotFound):
        task_approve(task_id=task.pk, user=other_user, approved=True)
    assert status(task) == TaskStatus.SUSPENDED


def test_a_signal_that_arrives_early_is_kept_and_consumed_exactly_once(user):
    task = start(
        user, {"think": "busy"}, {"wait_event": "paid"}, {"wait_event": "paid"}, {"final": "x"}
    )
    early = task_signal(task_id=task.pk, user=user, name="paid", payload={"amount": 5})
    assert early.consumed_at is None
    run_until_idle()
    # The first wait consumed the early signal without suspending; the second waits.
    assert status(task) == TaskStatus.SUSPENDED
    early.refresh_from_db()
    assert early.consumed_at_step == 2
    second = task_signal(task_id=task.pk, user=user, name="paid", payload={"amount": 7})
    run_until_idle()
    assert status(task) == TaskStatus.COMPLETED
    assert Signal.objects.get(pk=second.pk).consumed_at_step == 3
    assert Signal.objects.filter(task=task, consumed_at__isnull=True).count() == 0
    consumed = AuditEvent.objects.filter(task=task, type="signal_consumed").order_by("seq")
    assert [c.payload["payload"] for c in consumed] == [{"amount": 5}, {"amount": 7}]


def test_a_signal_of_another_name_does_not_wake_the_wait(user):
    task = start(user, {"wait_event": "approved"}, {"final": 1})
    run_until_idle()
    task_signal(task_id=task.pk, user=user, name="something-else", payload=None)
    run_until_idle()
    assert status(task) == TaskStatus.SUSPENDED


def test_a_durable_timer_wakes_the_task_from_the_database(user):
    task = start(user, {"wait": 30}, {"final": "woke"})
    run_until_idle()
    assert status(task) == TaskStatus.SUSPENDED and queue_depth() == 0
    wait = Suspension.objects.get(task=task)
    assert wait.kind == "timer" and wait.wake_at > timezone.now()
    Suspension.objects.filter(pk=wait.pk).update(wake_at=timezone.now())
    run_until_idle()
    assert status(task) == TaskStatus.COMPLETED
    assert Suspension.objects.get(pk=wait.pk).resolution == "woken"


@pytest.mark.parametrize(
    ("entry", "expected_status", "expected_result"),
    [
        ({"approval": "?", "timeout": 0.01}, TaskStatus.FAILED, None),
        (
            {"approval": "?", "timeout": 0.01, "on_timeout": "reject", "on_reject": "continue"},
            TaskStatus.COMPLETED,
            "after",
        ),
        (
            {"wait_event": "e", "timeout": 0.01, "on_timeout": "continue", "default": {"d": 1}},
            TaskStatus.COMPLETED,
            "after",
        ),
        ({"wait_event": "e", "timeout": 0.01, "on_timeout": "fail"}, TaskStatus.FAILED, None),
    ],
    ids=["approval-fail", "approval-reject", "event-continue", "event-fail"],
)
def test_a_wait_with_its_own_timeout_applies_its_policy(
    user, entry, expected_status, expected_result
):
    task = start(user, entry, {"final": "after"})
    run_until_idle(wait=0.1)
    task.refresh_from_db()
    assert task.status == expected_status
    assert task.result == expected_result
    ended = AuditEvent.objects.get(task=task, type="wait_ended")
    assert ended.payload["timed_out"] is True
    if "default" in entry:
        assert Suspension.objects.get(task=task).payload == {"d": 1}


@pytest.mark.parametrize("where", ["pending", "suspended", "dead_lettered"])
def test_any_unfinished_task_can_be_cancelled_and_runs_nothing_more(user, where, settings):
    settings.AGENTS = {**settings.AGENTS, "MAX_RETRIES": 0}
    script = {
        "pending": [{"final": 1}],
        "suspended": [{"approval": "?"}, {"final": 1}],
        "dead_lettered": [{"fail": "x"}],
    }[where]
    task = start(user, *script)
    if where != "pending":
        run_until_idle()
    assert status(task) == where
    task_cancel(task_id=task.pk, user=user)
    run_until_idle()
    assert status(task) == TaskStatus.CANCELLED
    with pytest.raises(Conflict):
        task_cancel(task_id=task.pk, user=user)


def test_a_step_running_during_a_cancel_finishes_and_stops_at_its_checkpoint(user):
    task = start(user, {"tool": "ledger.append", "args": {"key": "k", "value": 1}}, {"final": 1})
    # The cancel lands while step 1 runs: between the step's work and its commit.
    from agents.core import engine

    original = engine.tools_run

    def cancel_midway(run, calls):
        results = original(run, calls)
        canceller = threading.Thread(
            target=lambda: (task_cancel(task_id=task.pk, user=user), connection.close())
        )
        canceller.start()
        canceller.join()
        return results

    engine.tools_run = cancel_midway
    try:
        assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    finally:
        engine.tools_run = original
    task.refresh_from_db()
    assert task.status == TaskStatus.CANCELLED and task.current_step == 2
    assert Checkpoint.objects.filter(task=task, step=1).exists(), "its work is kept"
    assert task.ledger.count() == 1
    run_until_idle()
    assert not Checkpoint.objects.filter(task=task, step=2).exists(), "nothing after it"


def _race(*operations):
    """Run the operations at the same moment on separate connections; their outcomes."""
    barrier = threading.Barrier(len(operations))
    outcomes: list = [None] * len(operations)

    def run(index, operation):
        barrier.wait()
        try:
            outcomes[index] = operation()
        except Exception as exc:  # noqa: BLE001 (the outcome is what we compare)
            outcomes[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, op)) for i, op in enumerate(operations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize("repeat", range(5))
def test_approve_and_cancel_at_once_resolve_the_wait_once_and_the_cancel_stands(user, repeat):
    task = start(user, {"approval": "?"}, {"final": 1})
    run_until_idle()
    outcomes = _race(
        lambda: task_approve(task_id=task.pk, user=user, approved=True),
        lambda: task_cancel(task_id=task.pk, user=user),
    )
    approve, cancel = outcomes
    # Exactly one of them ends the wait. A cancel is never refused on an unfinished task:
    # after the approval it cancels the resumed task; before it, the approval gets 409.
    assert not isinstance(cancel, Exception), outcomes
    wait = Suspension.objects.get(task=task)
    if isinstance(approve, Exception):
        assert isinstance(approve, Conflict)
        assert wait.resolution == "cancelled"
        assert "approval_decided" not in types(task)
    else:
        assert wait.resolution == "approved"
        assert types(task).count("approval_decided") == 1
    run_until_idle()
    assert status(task) == TaskStatus.CANCELLED
    assert not Checkpoint.objects.filter(task=task, step=2).exists()


@pytest.mark.parametrize("repeat", range(5))
def test_two_approvals_at_once_have_exactly_one_winner(user, other_user, repeat):
    task = start(user, {"approval": "?"}, {"final": 1})
    run_until_idle()
    other_user.user_permissions.add(Permission.objects.get(codename="change_agenttask"))
    other_user = type(other_user).objects.get(pk=other_user.pk)  # no cached permissions
    outcomes = _race(
        lambda: task_approve(task_id=task.pk, user=user, approved=True),
        lambda: task_approve(task_id=task.pk, user=other_user, approved=False),
    )
    assert sum(isinstance(o, Conflict) for o in outcomes) == 1, outcomes
    assert types(task).count("approval_decided") == 1


@pytest.mark.parametrize("repeat", range(5))
def test_a_signal_during_a_resume_is_consumed_once(user, repeat):
    task = start(user, {"wait_event": "go"}, {"wait_event": "go"}, {"final": 1})
    run_until_idle()
    outcomes = _race(
        lambda: task_signal(task_id=task.pk, user=user, name="go", payload=1),
        lambda: task_signal(task_id=task.pk, user=user, name="go", payload=2),
    )
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    run_until_idle()
    assert status(task) == TaskStatus.COMPLETED
    consumed = Signal.objects.filter(task=task).order_by("consumed_at_step")
    assert [s.consumed_at_step for s in consumed] == [1, 2], "each signal consumed once"


def test_the_approve_and_signal_commands(user):
    task = start(user, {"approval": "?"}, {"wait_event": "ready"}, {"final": "ok"})
    run_until_idle()
    out = StringIO()
    call_command("approve", str(task.pk), "--comment", "from the runbook", stdout=out)
    assert "running" in out.getvalue()
    run_until_idle()
    call_command("signal", str(task.pk), "ready", "--payload", '{"x": 1}', stdout=out)
    assert "consumed by the waiting task" in out.getvalue()
    run_until_idle()
    assert status(task) == TaskStatus.COMPLETED


def test_the_waits_command_lists_who_waits_for_what(user):
    asking = start(user, {"approval": "ship it?"}, {"final": 1})
    listening = start(user, {"wait_event": "payment"}, {"final": 1})
    start(user, {"final": "not waiting"})
    run_until_idle()
    out = StringIO()
    call_command("waits", stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert str(asking.pk) in lines[0] and "ship it?" in lines[0] and "approval" in lines[0]
    assert str(listening.pk) in lines[1] and "payment" in lines[1]
    only = StringIO()
    call_command("waits", "--kind", "event", stdout=only)
    assert str(asking.pk) not in only.getvalue() and str(listening.pk) in only.getvalue()
