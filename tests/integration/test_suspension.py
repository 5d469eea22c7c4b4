"""Suspended tasks on real workers, through a worker crash and a broker restart."""

from __future__ import annotations

import pytest
from django.utils import timezone

from agents.core.suspensions import task_approve, task_signal
from agents.models import AgentTask, Signal, Suspension, TaskStatus
from agents.services import task_start
from agents_project.celery import app
from tests.helpers import publishes_to, queue_depth, wait_until, worker_env
from tests.integration.servers import private_rabbitmq

pytestmark = pytest.mark.integration


def _status(task_id) -> str:
    return AgentTask.objects.get(pk=task_id).status


def _active_steps(hostname: str) -> list:
    replies = app.control.inspect(destination=[hostname], timeout=3).active() or {}
    return [task for tasks in replies.values() for task in tasks]


def test_a_suspended_task_holds_no_worker_and_no_message(workers, user):
    workers.start(concurrency=1)
    task, _ = task_start(
        owner=user, agent="scripted", input={"script": [{"approval": "?"}, {"final": 1}]}
    )
    wait_until(lambda: _status(task.pk) == TaskStatus.SUSPENDED, timeout=30)
    assert queue_depth() == 0
    # This test's own worker, by name: never another run's on the same machine.
    hostname = workers.node_name(0)
    wait_until(lambda: app.control.inspect(destination=[hostname], timeout=2).ping(), timeout=30)
    assert _active_steps(hostname) == []
    # The one pool process is free: another task runs to completion meanwhile.
    other, _ = task_start(owner=user, agent="scripted", input={"script": [{"final": 2}]})
    wait_until(lambda: _status(other.pk) == TaskStatus.COMPLETED, timeout=30)
    assert _status(task.pk) == TaskStatus.SUSPENDED


def test_waits_survive_a_worker_crash_and_a_broker_restart(workers, user):
    with private_rabbitmq() as rabbit, publishes_to(rabbit.url):
        env = worker_env(CELERY_BROKER_URL=rabbit.url)
        workers.start(concurrency=2, **env)
        approval, _ = task_start(
            owner=user, agent="scripted", input={"script": [{"approval": "?"}, {"final": "a"}]}
        )
        event, _ = task_start(
            owner=user,
            agent="scripted",
            input={"script": [{"wait_event": "go"}, {"wait_event": "go"}, {"final": "e"}]},
        )
        timer, _ = task_start(
            owner=user, agent="scripted", input={"script": [{"wait": 8}, {"final": "t"}]}
        )
        ids = [approval.pk, event.pk, timer.pk]
        wait_until(lambda: all(_status(i) == TaskStatus.SUSPENDED for i in ids), timeout=30)
        # Everything that could hold them goes away at once: the worker, the broker.
        workers.kill(0)
        rabbit.restart()
        workers.start(concurrency=2, **env)
        # Two signals for the two waits, sent while the task is still suspended.
        task_signal(task_id=event.pk, user=user, name="go", payload=1)
        task_signal(task_id=event.pk, user=user, name="go", payload=2)
        task_approve(task_id=approval.pk, user=user, approved=True)
        wait_until(lambda: all(_status(i) == TaskStatus.COMPLETED for i in ids), timeout=60)
    signals = Signal.objects.filter(task=event).order_by("id")
    assert [s.consumed_at_step for s in signals] == [1, 2], "each signal consumed once"
    wait = Suspension.objects.get(task=timer)
    late = (wait.resolved_at - wait.wake_at).total_seconds()
    print(f"the timer fired {late:.2f} s after its time, across the restarts")
    assert wait.resolution == "woken" and late >= 0
    assert wait.resolved_at <= timezone.now()
