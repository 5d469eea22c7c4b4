"""Graceful shutdown on SIGTERM, and several workers sharing the work."""

from __future__ import annotations

import signal
import time

import pytest

from agents.models import AgentTask, Checkpoint
from audit.models import AuditEvent
from tests.helpers import wait_until
from tests.integration import scenario

pytestmark = pytest.mark.integration


def long_step(seconds: float) -> list[dict]:
    return [
        {"think": "begin"},
        {"sleep": seconds},
        {"tool": "ledger.append", "args": {"key": "after", "value": 1}},
        {"final": "done"},
    ]


def _running_step(task_id: str, step: int) -> bool:
    # The long step has started once the step before it has committed.
    return Checkpoint.objects.filter(task_id=task_id, step=step - 1).exists()


def test_sigterm_lets_the_running_step_finish_and_exits_cleanly(workers):
    script = long_step(3)
    worker = workers.start(concurrency=1, AGENTS_SHUTDOWN_GRACE="20")
    [task_id] = scenario.create(1, script=script)
    wait_until(lambda: _running_step(task_id, 2), timeout=30)
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)  # to the main process only, as Kubernetes does
    assert worker.wait(30) == 0
    # The long step finished and committed before the worker left; nothing after it ran.
    task = AgentTask.objects.get(pk=task_id)
    assert task.current_step == 3 and task.status == "running"
    workers.start(concurrency=1)
    wait_until(lambda: scenario.finished([task_id]), timeout=30)
    assert scenario.check([task_id], script=script) == []


def test_sigterm_past_the_grace_period_hands_the_step_back(workers):
    script = long_step(8)
    worker = workers.start(concurrency=1, AGENTS_SHUTDOWN_GRACE="1")
    [task_id] = scenario.create(1, script=script)
    wait_until(lambda: _running_step(task_id, 2), timeout=30)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(30)
    stopped = time.monotonic() - started
    print(f"worker exited with {code} after {stopped:.1f} s")
    assert code == 0
    # It did not wait for the 8 s step beyond its 1 s grace: the step never committed.
    assert AgentTask.objects.get(pk=task_id).current_step == 2
    # Its message went back to the queue: the next worker runs the step, once.
    workers.start(concurrency=1)
    wait_until(lambda: scenario.finished([task_id]), timeout=30)
    assert scenario.check([task_id], script=script) == []


SHORT = [
    {"tool": "ledger.append", "args": {"key": "a", "value": 1}},
    {"think": "between"},
    {"tool": "ledger.append", "args": {"key": "b", "value": 2}},
    {"final": "ok"},
]


def test_three_workers_share_two_hundred_tasks_without_loss_or_duplicates(workers):
    for _ in range(3):
        workers.start(concurrency=2)
    ids = scenario.create(200, script=SHORT)
    wait_until(lambda: scenario.finished(ids), timeout=240)
    assert scenario.check(ids, script=SHORT) == []
    actors = set(
        AuditEvent.objects.filter(task_id__in=ids, type="step").values_list("actor", flat=True)
    )
    print(f"{len(ids)} tasks, steps run by {len(actors)} worker processes")
    assert len(actors) >= 3, "the work was spread over the workers' processes"
