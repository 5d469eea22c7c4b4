"""State schema versioning: older checkpoints migrate forward; newer ones are left alone."""

from __future__ import annotations

import pytest

from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.definition import _REGISTRY, Agent, Continue, Finish, StepContext, register
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def v1_to_v2(state):
    return {"count": state["n"], "unit": "items"}


def v2_to_v3(state):
    return {**state, "label": f"{state['count']} {state['unit']}"}


class CounterV1(Agent):
    name = "counter"
    version = "1.0"
    state_version = 1

    def initial_state(self, input):
        return {"n": input["start"]}

    def step(self, ctx: StepContext):
        if ctx.step == 1:
            return Continue(state={"n": ctx.state["n"] + 1})
        return Finish(result=ctx.state)


class CounterV3(Agent):
    name = "counter"
    version = "3.0"
    # Its migrations cover version 1.0's states: it takes over 1.0's tasks.
    compatible_versions = ("1.0",)
    state_version = 3
    migrations = {1: v1_to_v2, 2: v2_to_v3}

    def step(self, ctx: StepContext):
        return Finish(result=ctx.state["label"])


@pytest.fixture
def deploy():
    """Swap the registered 'counter' agent, as a deploy or a rollback would."""

    def swap(cls):
        register(cls)

    yield swap
    _REGISTRY.pop("counter", None)


def test_an_older_checkpoint_is_migrated_in_order_and_audited(user, deploy):
    deploy(CounterV1)
    task, _ = task_start(owner=user, agent="counter", input={"start": 41})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    # New code is deployed while the task is between steps.
    deploy(CounterV3)
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == "42 items"
    migrated = AuditEvent.objects.filter(task=task, type="state_migrated").order_by("seq")
    assert [(e.payload["from_version"], e.payload["to_version"]) for e in migrated] == [
        (1, 2),
        (2, 3),
    ]
    assert Checkpoint.objects.get(task=task, step=1).schema_version == 1, "old checkpoint kept"
    assert Checkpoint.objects.get(task=task, step=2).schema_version == 3


def test_a_newer_checkpoint_is_never_touched_by_older_code(user, deploy):
    deploy(CounterV3)

    class CounterV3Slow(CounterV3):
        def step(self, ctx):
            return Continue(state={**ctx.state, "count": ctx.state["count"] + 1})

    deploy(CounterV3Slow)
    task, _ = task_start(owner=user, agent="counter", input={"start": 1})
    Checkpoint.objects.filter(task=task, step=0).update(
        state={"count": 1, "unit": "items", "label": "1 items"}, schema_version=3
    )
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    before = Checkpoint.objects.get(task=task, step=1)
    # A rollback: the running code only knows version 1.
    deploy(CounterV1)
    assert step_execute(task_id=task.pk, step=2) == StepResult.REFUSED
    assert step_execute(task_id=task.pk, step=2) == StepResult.REFUSED
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.current_step == 2
    after = Checkpoint.objects.get(task=task, step=1)
    assert (after.state, after.schema_version) == (before.state, before.schema_version)
    assert not Checkpoint.objects.filter(task=task, step=2).exists()
    refusals = AuditEvent.objects.filter(task=task, type="schema_refused")
    assert refusals.count() == 1, "a repeated refusal is not written twice"
    assert "schema version 3" in refusals.get().payload["reason"]
    # Rolling forward again, the task carries on from where it was.
    deploy(CounterV3Slow)
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    assert AgentTask.objects.get(pk=task.pk).current_step == 3
