"""``python manage.py versions``: the report per agent and version (tasks by status, live
workers, intake), a rollback and its restore, as an operator runs them."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from agents.core.versions import worker_versions_announce
from agents.definition import _REGISTRY, Agent, Finish, StepContext, register
from agents.models import AgentTask, VersionHold
from agents.services import task_start

pytestmark = pytest.mark.django_db


class ReportedV1(Agent):
    name = "reported"
    version = "1"

    def step(self, ctx: StepContext):
        return Finish(result=self.version)


class ReportedV2(ReportedV1):
    version = "2"


class ReportedV3(ReportedV1):
    version = "3"
    compatible_versions = ("2",)


@pytest.fixture
def agent():
    register(ReportedV1)
    yield
    _REGISTRY.pop("reported", None)


def _versions(*args: str) -> list[dict]:
    """The JSON report, after the line a --rollback or --restore prints first."""
    out = StringIO()
    call_command("versions", "reported", "--json", *args, stdout=out)
    text = out.getvalue()
    return json.loads(text[text.index("[") :])


def test_the_report_counts_tasks_and_workers_per_version_and_where_new_tasks_go(agent):
    owner = User.objects.create(username="reporter")
    worker_versions_announce(worker="w1", agents={"reported": ReportedV1()})
    first, _ = task_start(owner=owner, agent="reported", input={})
    worker_versions_announce(worker="w2", agents={"reported": ReportedV2()})
    second, _ = task_start(owner=owner, agent="reported", input={})
    assert (first.agent_version, second.agent_version) == ("1", "2")
    AgentTask.objects.filter(pk=first.pk).update(status="completed")

    rows = {row["version"]: row for row in _versions()}
    assert rows["1"]["tasks"] == {"completed": 1}
    assert rows["2"]["tasks"] == {"pending": 1}
    assert (rows["1"]["workers"], rows["2"]["workers"]) == (["w1"], ["w2"])
    assert (rows["1"]["intake_percent"], rows["2"]["intake_percent"]) == (0.0, 100.0)

    worker_versions_announce(worker="w3", agents={"reported": ReportedV3()})
    rows = {row["version"]: row for row in _versions()}
    assert rows["2"]["compatible_workers"] == ["w3"], "3 declares 2 compatible"
    assert rows["3"]["intake_percent"] == 100.0


def test_a_rollback_sends_new_tasks_elsewhere_and_a_restore_undoes_it(agent):
    worker_versions_announce(worker="w1", agents={"reported": ReportedV1()})
    worker_versions_announce(worker="w2", agents={"reported": ReportedV2()})
    out = StringIO()
    call_command("versions", "--rollback", "reported", "2", "--reason", "bad", stdout=out)
    assert "reported 2 takes no new tasks" in out.getvalue()
    assert VersionHold.objects.get(agent="reported", version="2").reason == "bad"
    rows = {row["version"]: row for row in _versions()}
    assert rows["2"]["held"] and rows["2"]["intake_percent"] == 0.0
    assert rows["1"]["intake_percent"] == 100.0
    owner = User.objects.create(username="after-rollback")
    task, _ = task_start(owner=owner, agent="reported", input={})
    assert task.agent_version == "1"

    restored = _versions("--restore", "reported", "2")
    rows = {row["version"]: row for row in restored}
    assert not rows["2"]["held"] and rows["2"]["intake_percent"] == 100.0
    assert not VersionHold.objects.filter(agent="reported").exists()


def test_the_table_says_when_a_version_with_work_has_no_live_worker(agent):
    owner = User.objects.create(username="orphaned")
    task_start(owner=owner, agent="reported", input={})  # no worker: this code's version
    out = StringIO()
    call_command("versions", "reported", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["agent", "version", "intake", "tasks", "workers"]
    assert any("NO LIVE WORKER" in line and "pending=1" in line for line in lines[1:])
