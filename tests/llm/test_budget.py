"""Budget approvals always make progress: approving lets the call asked about go out,
and the question says how much it grants (on the real queue, against the scripted
chat-completions server on loopback through the real ``openai`` SDK)."""

from __future__ import annotations

import re

import pytest

from agents.core.suspensions import task_approve
from agents.models import AgentTask, Checkpoint, Suspension, TaskStatus
from agents.permissions import operator_group_ensure
from agents.services import task_start
from llm.models import ModelCall
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)

# About 500 tokens a request, as the scripted server counts them (characters / 4).
LONG_PROMPT = "count the words of this text: " + "lorem ipsum " * 170


@pytest.fixture
def operator(django_user_model):
    olga = django_user_model.objects.create_user(username="olga", password="pw", is_staff=True)
    olga.groups.add(operator_group_ensure())
    return olga


def status_of(task: AgentTask) -> str:
    return AgentTask.objects.values_list("status", flat=True).get(pk=task.pk)


def question(task: AgentTask) -> str:
    return Suspension.objects.filter(task=task, resolved_at__isnull=True).get().reason


def test_each_approval_lets_the_call_it_was_asked_about_go_out(chat, user, operator):
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "2 + 3"}}]},
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "4 + 5"}}]},
        {"content": "done"},
    ]
    task, _ = task_start(
        owner=user,
        agent="llm",
        input={
            "prompt": LONG_PROMPT,
            "tools": ["calc"],
            "budget": {"tokens": 100},
            "on_budget": "approval",
        },
    )
    run_until_idle()
    approvals = 0
    while status_of(task) == TaskStatus.SUSPENDED:
        asked = question(task)
        before = chat.count(task=task.pk)
        task_approve(task_id=task.pk, user=operator, approved=True)
        approvals += 1
        run_until_idle()
        assert chat.count(task=task.pk) == before + 1, f"approval {approvals}: {asked}"
        # The question said how many tokens approving grants: at least the budget's size.
        offer = re.search(r"Approve (\d+) more tokens for this task\?", asked)
        assert offer is not None, asked
        assert int(offer.group(1)) >= 100
        assert approvals <= 3
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result == {"answer": "done"}
    assert approvals == 3 == chat.count(task=task.pk) == ModelCall.objects.filter(task=task).count()
    state = Checkpoint.objects.filter(task=task).latest("step").state
    assert state["budget_grants"] == 3
    # Each grant was recorded: the limit now is the budget plus three grants, each at
    # least the budget's size and together about what the three calls used.
    assert state["budget_offer"] is None
    spent = sum(c.total_tokens for c in ModelCall.objects.filter(task=task))
    assert 100 + 3 * 100 < state["budget_limit"]["tokens"] <= spent


def test_a_grant_covers_every_limit_the_budget_has(chat, user, operator, settings):
    settings.LLM = {**settings.LLM, "MODELS": {"scripted": {"price": {"input": 1, "output": 1}}}}
    chat.script = [{"content": "done"}]
    task, _ = task_start(
        owner=user,
        agent="llm",
        input={
            "prompt": LONG_PROMPT,
            "budget": {"tokens": 100, "cost": 0.00001, "model_calls": 5},
            "on_budget": "approval",
        },
    )
    run_until_idle()
    assert status_of(task) == TaskStatus.SUSPENDED
    asked = question(task)
    assert re.search(r"Approve \d+ more tokens, 5 more model calls and [\d.]+ more in cost", asked)
    task_approve(task_id=task.pk, user=operator, approved=True)
    run_until_idle()
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert chat.count(task=task.pk) == 1
