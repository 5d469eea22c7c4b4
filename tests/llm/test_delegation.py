"""An ``llm`` agent delegating to agents (``agent:<name>`` tools): each call a child
task, the parent holding no worker, the children's results as the calls' results, and
their model spend counted against the parent's budget (on the real queue, against the
scripted chat-completions server through the real ``openai`` SDK)."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from agents_project.errors import InvalidInput
from llm.models import Message
from llm.step import wire_name
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)

DELEGATE = wire_name("agent:llm")


def _delegating(chat) -> None:
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
            {"content": "the sky is blue and the sea is wet"},
        ],
    }


def test_a_model_delegates_to_child_tasks_and_reads_their_results(chat, user):
    _delegating(chat)
    task, _ = task_start(
        owner=user, agent="llm", input={"prompt": "supervise", "tools": ["agent:llm"]}
    )
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result == {"answer": "the sky is blue and the sea is wet"}
    children = list(AgentTask.objects.filter(parent=task).order_by("spawn_index"))
    assert [c.result for c in children] == [{"answer": "blue"}, {"answer": "wet"}]
    assert [c.input["prompt"] for c in children] == ["research the sky", "research the sea"]
    tool_messages = list(
        Message.objects.filter(task=task, role="tool")
        .order_by("seq")
        .values_list("content", flat=True)
    )
    assert tool_messages == ['{"answer": "blue"}', '{"answer": "wet"}']
    usage = Checkpoint.objects.filter(task=task).latest("step").state["usage"]
    # The parent's two calls and each child's one.
    assert usage["model_calls"] == 4


def test_the_childrens_spend_counts_against_the_parents_budget(chat, user):
    _delegating(chat)
    task, _ = task_start(
        owner=user,
        agent="llm",
        input={"prompt": "supervise", "tools": ["agent:llm"], "budget": {"model_calls": 3}},
    )
    run_until_idle()
    task.refresh_from_db()
    # One call of its own and two of its children: a fourth would pass the budget.
    assert task.status == TaskStatus.FAILED
    assert task.error.startswith("budget_exceeded"), task.error
    assert chat.count(task=task.pk) == 1
    assert AgentTask.objects.filter(parent=task, status="completed").count() == 2


def test_an_unknown_agent_tool_is_refused_naming_the_field(user):
    with pytest.raises(InvalidInput) as refused:
        task_start(owner=user, agent="llm", input={"prompt": "x", "tools": ["agent:nobody"]})
    assert refused.value.field == "input.tools[0]"
