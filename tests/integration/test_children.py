"""Child tasks on real workers: joins, failures, the cancel cascade, and no worker held."""

from __future__ import annotations

import pytest

from agents.core.suspensions import task_cancel
from agents.models import AgentTask, Suspension, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def _status(task_id) -> str:
    return AgentTask.objects.get(pk=task_id).status


def _child(script: list) -> dict:
    return {"agent": "scripted", "input": {"script": script}}


def test_a_parent_joins_all_its_children_and_gets_their_results_in_spawn_order(workers, user):
    # One pool process: the parent holds none while it waits, or its children never run.
    workers.start(concurrency=1)
    parent, _ = task_start(
        owner=user,
        agent="scripted",
        input={
            "script": [
                {"spawn": [_child([{"sleep": 0.3}, {"final": "a"}]), _child([{"final": "b"}])]},
            ]
        },
    )
    wait_until(lambda: _status(parent.pk) == TaskStatus.COMPLETED, timeout=60)
    parent.refresh_from_db()
    assert parent.result == ["a", "b"]
    children = list(AgentTask.objects.filter(parent=parent).order_by("spawn_index"))
    assert [c.status for c in children] == [TaskStatus.COMPLETED] * 2
    assert {c.owner_id for c in children} == {user.pk}
    types = list(
        AuditEvent.objects.filter(task=parent).order_by("seq").values_list("type", flat=True)
    )
    assert types.count("children_started") == 1
    assert types.count("child_ended") == 2
    created = AuditEvent.objects.get(task=children[0], type="created")
    assert created.payload["parent"] == str(parent.pk)
    assert Suspension.objects.get(task=parent).resolution == "joined"


def test_join_any_takes_the_first_and_cancels_the_rest(workers, user):
    workers.start(concurrency=2)
    parent, _ = task_start(
        owner=user,
        agent="scripted",
        input={
            "script": [
                {
                    "spawn": [_child([{"wait_event": "never"}]), _child([{"final": "fast"}])],
                    "join": "any",
                },
                {"think": "done"},
            ]
        },
    )
    wait_until(lambda: _status(parent.pk) == TaskStatus.COMPLETED, timeout=60)
    parent.refresh_from_db()
    assert parent.result == "fast"
    slow = AgentTask.objects.get(parent=parent, spawn_index=0)
    wait_until(lambda: _status(slow.pk) == TaskStatus.CANCELLED, timeout=30)


def test_a_failed_child_fails_a_join_of_all_and_its_siblings_are_cancelled(workers, user):
    workers.start(concurrency=2)
    parent, _ = task_start(
        owner=user,
        agent="scripted",
        input={
            "script": [
                {
                    "spawn": [
                        _child([{"wait_event": "never"}]),
                        _child([{"fail": "boom", "permanent": True}]),
                    ]
                },
                {"final": "never reached"},
            ]
        },
    )
    wait_until(lambda: _status(parent.pk) == TaskStatus.FAILED, timeout=60)
    parent.refresh_from_db()
    failed = AgentTask.objects.get(parent=parent, spawn_index=1)
    assert parent.error.startswith(f"child {failed.pk} (scripted) ended failed")
    assert "boom" in parent.error
    waiting = AgentTask.objects.get(parent=parent, spawn_index=0)
    wait_until(lambda: _status(waiting.pk) == TaskStatus.CANCELLED, timeout=30)


def test_cancelling_a_parent_cancels_its_live_children_and_grandchildren(workers, user):
    workers.start(concurrency=2)
    grandchild = _child([{"wait_event": "never"}])
    parent, _ = task_start(
        owner=user,
        agent="scripted",
        input={
            "script": [
                {
                    "spawn": [
                        _child([{"spawn": [grandchild]}]),
                        _child([{"wait_event": "never"}]),
                    ]
                }
            ]
        },
    )
    wait_until(
        lambda: AgentTask.objects.filter(parent__parent=parent, status="suspended").count() == 1,
        timeout=60,
    )
    task_cancel(task_id=parent.pk, user=user)
    family = AgentTask.objects.filter(parent=parent) | AgentTask.objects.filter(
        parent__parent=parent
    )
    wait_until(
        lambda: set(family.values_list("status", flat=True)) == {TaskStatus.CANCELLED}, timeout=30
    )
    assert family.count() == 3


def test_a_parent_deadline_ends_the_parent_and_its_children(workers, user):
    # A child has its parent's deadline: whichever the scheduler reaches first, the
    # parent ends timed_out (not "a child failed") and the child does not outlive it.
    workers.start(concurrency=2)
    parent, _ = task_start(
        owner=user,
        agent="scripted",
        input={"script": [{"spawn": [_child([{"wait_event": "never"}])]}]},
        timeout_seconds=15,
    )
    wait_until(
        lambda: AgentTask.objects.filter(parent=parent, status="suspended").exists(), timeout=30
    )
    wait_until(lambda: _status(parent.pk) == TaskStatus.TIMED_OUT, timeout=60)
    child = AgentTask.objects.get(parent=parent)
    wait_until(
        lambda: _status(child.pk) in (TaskStatus.CANCELLED, TaskStatus.TIMED_OUT), timeout=30
    )
    assert child.deadline == parent.deadline
