"""Fair sharing between owners (issue 12, item 9): per-owner limits of tasks running at
once, tasks over the limit waiting without a broker message, round-robin admission."""

from __future__ import annotations

import pytest

from agents.core.admission import admissions_grant
from agents.core.scheduler import stuck_tasks, stuck_tasks_republish
from agents.core.suspensions import task_cancel
from agents.definition import Agent, Finish, registered_agents
from agents.diagnosis import task_diagnosis
from agents.models import AgentTask, TaskStatus
from agents.services import task_replay, task_start
from tests.helpers import queue_depth, run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def start(user, *script):
    return task_start(owner=user, agent="scripted", input={"script": list(script)})[0]


def waiting(user) -> int:
    return AgentTask.objects.filter(owner=user, queued_for_admission=True).count()


def test_over_the_owner_limit_tasks_wait_without_a_message(user, settings):
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": 2}
    tasks = [start(user, {"final": i}) for i in range(5)]
    assert queue_depth() == 2, "only the admitted tasks have a message"
    assert [t.queued_for_admission for t in tasks] == [False, False, True, True, True]
    assert all(t.status == TaskStatus.PENDING for t in tasks)
    assert {t.in_flight for t in tasks[2:]} == {0}
    # The sweep never publishes a task waiting for admission, even with --include-queued.
    assert not stuck_tasks().filter(pk__in=[t.pk for t in tasks[2:]]).exists()
    assert not stuck_tasks(include_queued=True).filter(pk__in=[t.pk for t in tasks[2:]]).exists()
    assert stuck_tasks_republish(actor="test") == 0
    assert admissions_grant() == 0, "the owner is at its limit"
    diagnosis = task_diagnosis(AgentTask.objects.get(pk=tasks[4].pk))
    assert diagnosis["waiting_on"]["kind"] == "admission"

    run_until_idle()
    assert AgentTask.objects.filter(owner=user, status=TaskStatus.COMPLETED).count() == 5
    assert waiting(user) == 0


def test_admission_is_round_robin_across_owners(user, other_user, settings):
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": 1}
    busy = [start(user, {"final": i}) for i in range(6)]
    quiet = [start(other_user, {"final": i}) for i in range(2)]
    assert queue_depth() == 2, "one admitted task per owner"
    # Finish the admitted ones without the scheduler (no admission yet).
    AgentTask.objects.filter(pk__in=[busy[0].pk, quiet[0].pk]).update(status=TaskStatus.COMPLETED)
    assert admissions_grant() == 2, "one for each owner with free capacity"
    admitted = AgentTask.objects.filter(queued_for_admission=False, status=TaskStatus.PENDING)
    assert set(admitted.values_list("pk", flat=True)) >= {busy[1].pk, quiet[1].pk}
    assert waiting(user) == 4 and waiting(other_user) == 0


def test_a_new_task_of_an_owner_with_waiting_tasks_queues_behind_them(user, settings):
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": 1}
    first, second = start(user, {"final": 1}), start(user, {"final": 2})
    AgentTask.objects.filter(pk=first.pk).update(status=TaskStatus.COMPLETED)
    third = start(user, {"final": 3})
    assert third.queued_for_admission, "a free place goes to the oldest waiting task"
    assert admissions_grant() == 1
    assert not AgentTask.objects.get(pk=second.pk).queued_for_admission
    assert AgentTask.objects.get(pk=third.pk).queued_for_admission


def test_suspended_tasks_do_not_count_and_cancelled_waiting_tasks_leave(user, settings):
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": 1}
    asking = start(user, {"approval": "ok?"}, {"final": "done"})
    run_until_idle()
    assert AgentTask.objects.get(pk=asking.pk).status == TaskStatus.SUSPENDED
    free = start(user, {"final": 1})
    assert not free.queued_for_admission, "a suspended task holds no worker: not counted"
    queued = start(user, {"final": 2})
    assert queued.queued_for_admission
    task_cancel(task_id=queued.pk, user=user)
    assert AgentTask.objects.get(pk=queued.pk).status == TaskStatus.CANCELLED
    run_until_idle()
    assert AgentTask.objects.get(pk=free.pk).status == TaskStatus.COMPLETED
    assert admissions_grant() == 0


def test_replays_wait_for_admission_too(user, settings):
    done = start(user, {"final": 1})
    run_until_idle()
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": 1}
    start(user, {"final": 2})
    replay = task_replay(task_id=done.pk, user=user, from_step=0)
    assert replay.queued_for_admission and replay.in_flight == 0
    run_until_idle()
    assert AgentTask.objects.get(pk=replay.pk).status == TaskStatus.COMPLETED


class _Limited(Agent):
    name = "limited-per-owner"
    max_running_per_owner = 1

    def step(self, ctx):
        return Finish(result="ok")


@pytest.fixture
def limited_agent():
    from agents import definition

    definition.register(_Limited)
    yield
    definition._REGISTRY.pop(_Limited.name, None)


def test_an_agents_own_limit_holds_back_only_its_tasks(user, limited_agent, settings):
    assert settings.AGENTS["OWNER_MAX_RUNNING"] == 0
    assert "limited-per-owner" in registered_agents()
    a = task_start(owner=user, agent="limited-per-owner", input={})[0]
    b = task_start(owner=user, agent="limited-per-owner", input={})[0]
    other = start(user, {"final": 1})
    assert (a.queued_for_admission, b.queued_for_admission) == (False, True)
    assert not other.queued_for_admission, "another agent's task is not held back"
    run_until_idle()
    assert AgentTask.objects.get(pk=b.pk).status == TaskStatus.COMPLETED
