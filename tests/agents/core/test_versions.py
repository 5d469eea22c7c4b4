"""Version-pinned runs in-process: intake, refusal on another version, the sweep, and a
compatible newer version taking a task over (``agents.core.versions``)."""

from __future__ import annotations

import pytest

from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.core.scheduler import stuck_tasks
from agents.core.versions import (
    intake_shares,
    version_for_new_task,
    version_hold,
    worker_versions_announce,
    worker_versions_withdraw,
)
from agents.definition import _REGISTRY, Agent, Continue, Finish, StepContext, register
from agents.diagnosis import task_diagnosis
from agents.models import AgentTask
from agents.services import task_start
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)


class PinnedV1(Agent):
    name = "pinned"
    version = "1.9"

    def step(self, ctx: StepContext):
        if ctx.step == 1:
            return Continue(state={"ran": [self.version]})
        return Finish(result=[*ctx.state["ran"], self.version])


class PinnedV2(PinnedV1):
    version = "1.10"


class PinnedV2Compatible(PinnedV1):
    version = "1.10"
    compatible_versions = ("1.9",)


@pytest.fixture
def deploy():
    yield register
    _REGISTRY.pop("pinned", None)


def test_intake_takes_the_newest_served_version_a_ramp_and_never_a_held_one(deploy, settings):
    deploy(PinnedV1)
    assert version_for_new_task(agent=PinnedV1()) == "1.9", "no worker: this code's"
    worker_versions_announce(worker="w1", agents={"pinned": PinnedV1()})
    worker_versions_announce(worker="w2", agents={"pinned": PinnedV2()})
    assert intake_shares(agent="pinned") == {"1.10": 100.0}, "1.10 is newer than 1.9"
    task, _ = task_start(owner=_owner(), agent="pinned", input={})
    assert task.agent_version == "1.10"

    settings.AGENTS = {**settings.AGENTS, "VERSION_RAMP": {"pinned": {"1.10": 25}}}
    assert intake_shares(agent="pinned") == {"1.9": 75.0, "1.10": 25.0}
    version_hold(agent="pinned", version="1.10", actor="test")
    assert intake_shares(agent="pinned") == {"1.9": 100.0}
    worker_versions_withdraw(worker="w1")
    assert intake_shares(agent="pinned") == {}, "held, and nothing else served"


def test_a_step_of_another_version_is_refused_parked_and_swept_only_by_its_version(deploy):
    deploy(PinnedV1)
    task, _ = task_start(owner=_owner(), agent="pinned", input={})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    deploy(PinnedV2)
    assert step_execute(task_id=task.pk, step=2) == StepResult.REFUSED
    row = AgentTask.objects.get(pk=task.pk)
    assert (row.status, row.current_step, row.in_flight) == ("running", 2, 0)
    reason = AuditEvent.objects.get(task=task, type="schema_refused").payload["reason"]
    assert "runs pinned version 1.9; this worker serves version 1.10" in reason
    assert not stuck_tasks().filter(pk=task.pk).exists(), "1.10 never republishes it"
    waiting = task_diagnosis(row)["waiting_on"]
    assert waiting["detail"] == "step 2 waits for a worker running pinned version 1.9"
    deploy(PinnedV1)
    assert stuck_tasks().filter(pk=task.pk).exists()
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    assert AgentTask.objects.get(pk=task.pk).result == ["1.9", "1.9"]


def test_a_compatible_newer_version_takes_the_task_over_for_good(deploy):
    deploy(PinnedV1)
    task, _ = task_start(owner=_owner(), agent="pinned", input={})
    deploy(PinnedV2Compatible)
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    assert AgentTask.objects.get(pk=task.pk).agent_version == "1.10"
    deploy(PinnedV1)
    assert step_execute(task_id=task.pk, step=2) == StepResult.REFUSED
    deploy(PinnedV2Compatible)
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    assert AgentTask.objects.get(pk=task.pk).result == ["1.10", "1.10"]


def _owner():
    from agents.services import service_user

    return service_user("pinning")
