"""A model that delegates to agents, on real workers: one pool process is enough, since
the parent holds none while its children run (with and without the model gateway)."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from llm.step import wire_name
from tests.helpers import wait_until
from tests.integration.llm_helpers import llm_workers_start, status_of

pytestmark = pytest.mark.integration

DELEGATE = wire_name("agent:llm")


@pytest.mark.parametrize("gateway", [False, True])
def test_a_supervisor_delegates_to_two_children_on_one_pool_process(workers, user, chat, gateway):
    chat.scripts = {
        "research the sky": [{"content": "blue"}],
        "research the sea": [{"content": "wet"}],
        "supervise": [
            {
                "tool_calls": [
                    {"name": DELEGATE, "arguments": {"input": {"prompt": "research the sky"}}},
                    {"name": DELEGATE, "arguments": {"input": {"prompt": "research the sea"}}},
                ]
            },
            {"content": "blue and wet"},
        ],
    }
    llm_workers_start(workers, chat, gateway=gateway, concurrency=1)
    task, _ = task_start(
        owner=user, agent="llm", input={"prompt": "supervise", "tools": ["agent:llm"]}
    )
    wait_until(lambda: status_of(task) in (TaskStatus.COMPLETED, TaskStatus.FAILED), timeout=90)
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result == {"answer": "blue and wet"}
    children = AgentTask.objects.filter(parent=task).order_by("spawn_index")
    assert [c.result for c in children] == [{"answer": "blue"}, {"answer": "wet"}]
    # Each model request once: the supervisor's two, one per child.
    assert chat.count(task=task.pk) == 2
    assert all(chat.count(task=c.pk) == 1 for c in children)
