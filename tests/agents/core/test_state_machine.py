"""The one table of transitions, and the one function that applies it."""

from __future__ import annotations

import pytest
from django.db import transaction

from agents.core.state_machine import FINAL, TRANSITIONS, transition
from agents.models import AgentTask, TaskStatus
from agents_project.errors import IllegalTransition
from audit.models import AuditEvent
from audit.services import AuditBatch

pytestmark = pytest.mark.django_db

ALL = [s.value for s in TaskStatus]


def test_the_table_covers_exactly_the_eight_statuses():
    assert set(TRANSITIONS) == set(ALL)
    assert ALL == [
        "pending",
        "running",
        "suspended",
        "completed",
        "failed",
        "timed_out",
        "cancelled",
        "dead_lettered",
    ]
    assert {"completed", "failed", "timed_out", "cancelled"} == FINAL
    for nexts in TRANSITIONS.values():
        assert nexts <= set(ALL)


def _task(user, status):
    return AgentTask.objects.create(
        owner=user,
        agent_name="scripted",
        agent_version="1",
        input={},
        state_version=1,
        status=status,
    )


@pytest.mark.parametrize("current", ALL)
@pytest.mark.parametrize("to", ALL)
def test_every_pair_is_allowed_exactly_when_the_table_says(user, current, to):
    task = _task(user, current)
    with transaction.atomic():
        audit = AuditBatch(task, actor="test")
        if to in TRANSITIONS[current]:
            transition(task, to, audit=audit)
            audit.flush()
            task.save()
            event = AuditEvent.objects.get(task=task)
            assert event.type == "transition"
            assert event.payload["from"] == current and event.payload["to"] == to
            assert event.payload.get("resumed", False) == (
                current == "suspended" and to == "running"
            )
            assert (task.finished_at is not None) == (to in FINAL)
        else:
            with pytest.raises(IllegalTransition, match=f"is {current}; it cannot become {to}"):
                transition(task, to, audit=audit)
            assert task.status == current
            assert len(audit) == 0


@pytest.mark.django_db(transaction=True)
def test_a_transition_outside_a_transaction_is_refused(user):
    task = _task(user, "pending")
    with pytest.raises(RuntimeError, match="transaction"):
        transition(task, TaskStatus.RUNNING, audit=AuditBatch(task, actor="test"))
