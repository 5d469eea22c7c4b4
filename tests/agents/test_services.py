"""Accepting tasks: validation that names the field, idempotency, nothing half-written."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, Checkpoint
from agents.services import task_replay, task_start
from agents_project.errors import Backpressure, InvalidInput, NotFound
from audit.models import AuditEvent
from tests.helpers import queue_depth, run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)

SCRIPT = {"script": [{"think": "a"}, {"final": "b"}]}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"agent": "nope", "input": SCRIPT}, "agent"),
        ({"agent": 7, "input": SCRIPT}, "agent"),
        ({"agent": "scripted", "input": "not an object"}, "input"),
        ({"agent": "scripted", "input": {"script": []}}, "input.script"),
        ({"agent": "scripted", "input": {"script": [{"think": 1}]}}, "input.script[0].think"),
        ({"agent": "scripted", "input": {"script": [{"tool": "rm -rf"}]}}, "input.script[0].tool"),
        ({"agent": "scripted", "input": {"script": [{"final": 1}, {}]}}, "input.script[1]"),
        (
            {"agent": "scripted", "input": {"script": [{"fail": "x", "times": "2"}]}},
            "input.script[0].times",
        ),
        ({"agent": "scripted", "input": {"script": [{"wait": -1}]}}, "input.script[0].wait"),
        ({"agent": "scripted", "input": {"script": [{"final": float("nan")}]}}, "input"),
        ({"agent": "scripted", "input": {"script": [{"final": "x" * 300_000}]}}, "input"),
        ({"agent": "scripted", "input": {"script": [{"final": "nul\x00"}]}}, "input"),
        ({"agent": "scripted", "input": {"script": [{"final": "half \ud800"}]}}, "input"),
        ({"agent": "scripted", "input": SCRIPT, "timeout_seconds": -5}, "timeout_seconds"),
        ({"agent": "scripted", "input": SCRIPT, "timeout_seconds": "10"}, "timeout_seconds"),
        ({"agent": "scripted", "input": SCRIPT, "idempotency_key": ""}, "idempotency_key"),
        ({"agent": "scripted", "input": SCRIPT, "idempotency_key": "k" * 201}, "idempotency_key"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_written(user, kwargs, field):
    with pytest.raises(InvalidInput) as refused:
        task_start(owner=user, **kwargs)
    assert refused.value.field == field
    assert AgentTask.objects.count() == 0
    assert AuditEvent.objects.count() == 0
    assert queue_depth() == 0


def test_an_idempotency_key_returns_the_existing_task(user, other_user):
    first, created = task_start(owner=user, agent="scripted", input=SCRIPT, idempotency_key="k1")
    again, created_again = task_start(
        owner=user, agent="scripted", input=SCRIPT, idempotency_key="k1"
    )
    theirs, theirs_created = task_start(
        owner=other_user, agent="scripted", input=SCRIPT, idempotency_key="k1"
    )
    assert created and not created_again and theirs_created
    assert again.pk == first.pk and theirs.pk != first.pk
    assert AgentTask.objects.count() == 2
    assert queue_depth() == 2


def test_when_the_broker_refuses_nothing_is_left_behind(user, broker_unreachable):
    with pytest.raises(Backpressure):
        task_start(owner=user, agent="scripted", input=SCRIPT)
    assert AgentTask.objects.count() == 0
    assert Checkpoint.objects.count() == 0
    assert AuditEvent.objects.count() == 0


def test_replay_starts_a_linked_task_from_a_checkpoint_and_leaves_the_original(user, other_user):
    original, _ = task_start(
        owner=user,
        agent="scripted",
        input={
            "script": [
                {"tool": "calc", "args": {"expression": "1+1"}},
                {"think": "b"},
                {"final": "c"},
            ]
        },
    )
    run_until_idle()
    original.refresh_from_db()
    before = (original.status, original.current_step, original.audit_seq)
    replay = task_replay(task_id=original.pk, user=user, from_step=1)
    run_until_idle()
    replay.refresh_from_db()
    original.refresh_from_db()
    assert (original.status, original.current_step, original.audit_seq) == before
    assert replay.status == "completed" and replay.result == "c"
    assert replay.replayed_from_id == original.pk and replay.replayed_from_step == 1
    assert list(replay.checkpoints.values_list("step", flat=True)) == [1, 2, 3]
    first = AuditEvent.objects.filter(task=replay).order_by("seq").first()
    assert first.type == "replayed_from"
    assert first.payload == {"task": str(original.pk), "checkpoint": 1}
    with pytest.raises(NotFound):
        task_replay(task_id=original.pk, user=other_user, from_step=1)
    with pytest.raises(InvalidInput) as refused:
        task_replay(task_id=original.pk, user=user, from_step=99)
    assert refused.value.field == "from_step"
