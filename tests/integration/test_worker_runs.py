"""A real worker process runs scripted tasks on PostgreSQL and RabbitMQ."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from tests.helpers import wait_until
from tools.models import LedgerEntry

pytestmark = pytest.mark.integration

SCRIPT = [
    {"think": "look at the numbers"},
    {"tool": "calc", "args": {"expression": "2 ** 10"}},
    {"tool": "ledger.append", "args": {"key": "total", "value": 1024}},
    {"think": "write the answer"},
    {"final": "1024"},
]
EXPECTED_TYPES = [
    "created",
    "transition",
    "reasoning",
    "step",
    "tool_call",
    "tool_result",
    "step",
    "tool_call",
    "tool_result",
    "step",
    "reasoning",
    "step",
    "step",
    "transition",
]


def test_a_worker_runs_twenty_tasks_with_complete_ordered_trails(workers, user):
    workers.start(concurrency=4)
    tasks = [
        task_start(owner=user, agent="scripted", input={"script": SCRIPT})[0] for _ in range(20)
    ]
    ids = [t.pk for t in tasks]

    def all_done():
        statuses = set(AgentTask.objects.filter(pk__in=ids).values_list("status", flat=True))
        return statuses == {TaskStatus.COMPLETED}

    wait_until(all_done, timeout=60)
    for task in AgentTask.objects.filter(pk__in=ids):
        assert task.result == "1024"
        steps = list(
            Checkpoint.objects.filter(task=task).order_by("step").values_list("step", flat=True)
        )
        assert steps == [0, 1, 2, 3, 4, 5]
        trail = list(AuditEvent.objects.filter(task=task).order_by("seq"))
        assert [e.seq for e in trail] == list(range(1, len(trail) + 1))
        assert [e.type for e in trail] == EXPECTED_TYPES
        step_numbers = [e.step for e in trail]
        assert step_numbers == sorted(step_numbers)
        assert all(e.actor.startswith("worker:") for e in trail[1:])
        assert LedgerEntry.objects.filter(task=task).count() == 1
