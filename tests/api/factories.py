"""Tasks in the states the operator surfaces act on, made the real way: started through
the service and run by the in-process worker (``run_until_idle``) on the real queue."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.test import override_settings

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from audit.models import DeadLetter
from tests.helpers import run_until_idle

APPROVAL = {
    "script": [{"think": "look at the refund"}, {"approval": "Refund 42?"}, {"final": "ok"}]
}
EVENT = {"script": [{"wait_event": "paid"}, {"final": "ok"}]}
SIMPLE = {
    "script": [{"think": "a"}, {"tool": "calc", "args": {"expression": "6*7"}}, {"final": 42}]
}
FAILING = {"script": [{"think": "a"}, {"fail": "upstream is down"}]}


def started(owner: Any, script: dict[str, Any] = SIMPLE, **kwargs: Any) -> AgentTask:
    task, _ = task_start(owner=owner, agent="scripted", input=script, **kwargs)
    return task


def run(owner: Any, script: dict[str, Any], status: str) -> AgentTask:
    task = started(owner, script)
    run_until_idle()
    task.refresh_from_db()
    assert task.status == status, (task.status, task.error)
    return task


def completed(owner: Any) -> AgentTask:
    return run(owner, SIMPLE, TaskStatus.COMPLETED)


def waiting_for_approval(owner: Any) -> AgentTask:
    return run(owner, APPROVAL, TaskStatus.SUSPENDED)


def waiting_for_event(owner: Any) -> AgentTask:
    return run(owner, EVENT, TaskStatus.SUSPENDED)


def dead_lettered(owner: Any) -> tuple[AgentTask, DeadLetter]:
    """A task whose step failed with no retry left (``AGENTS_MAX_RETRIES`` 0)."""
    with override_settings(AGENTS={**settings.AGENTS, "MAX_RETRIES": 0}):
        task = run(owner, FAILING, TaskStatus.DEAD_LETTERED)
    return task, DeadLetter.objects.get(task=task)
