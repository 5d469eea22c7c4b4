"""The built-in ``llm`` agent, run step by step on the real queue, against a scripted
chat-completions server on loopback (the real ``openai`` SDK over real HTTP)."""

from __future__ import annotations

import json

import pytest

from agents.models import AgentTask
from agents.services import task_start
from audit.models import AuditEvent
from llm.models import Message, ModelCall
from llm.selectors import task_usage
from tests.helpers import run_until_idle
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)


def start(user, **input):
    task, _ = task_start(owner=user, agent="llm", input={"prompt": "add 2 and 3", **input})
    return task


def finish(task) -> AgentTask:
    run_until_idle()
    return AgentTask.objects.get(pk=task.pk)


def test_a_final_answer_completes_the_task(chat, user):
    chat.script = [{"content": "5"}]
    task = finish(start(user, system="be brief"))
    assert task.status == "completed"
    assert task.result == {"answer": "5"}
    sent = chat.received(task=task.pk)
    assert len(sent) == 1
    assert [m["role"] for m in sent[0].body["messages"]] == ["system", "user"]
    assert "tools" not in sent[0].body


def test_tool_calls_run_as_the_step_s_tools_and_their_results_reach_the_model(chat, user):
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "2 + 3"}}]},
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "sum", "value": 5}}]},
        {"content": "the sum is 5"},
    ]
    task = finish(start(user, tools=["calc", "ledger.append"]))
    assert task.status == "completed", task.error
    assert task.result == {"answer": "the sum is 5"}
    requests = chat.received(task=task.pk)
    assert [r.step for r in requests] == [1, 2, 3]
    names = [t["function"]["name"] for t in requests[0].body["tools"]]
    assert names == ["calc", "ledger_append"]
    calc = requests[0].body["tools"][0]["function"]["parameters"]
    assert calc["properties"] == {"expression": {"type": "string"}}
    assert calc["required"] == ["expression"]
    second = requests[1].body["messages"]
    assert second[-1]["role"] == "tool"
    assert second[-1]["content"] == "5"
    assert second[-1]["tool_call_id"] == second[-2]["tool_calls"][0]["id"]
    assert LedgerEntry.objects.get(task_id=task.pk).idempotency_key == f"{task.pk}:2:0"
    roles = list(Message.objects.filter(task=task).values_list("role", flat=True))
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


def test_every_model_call_is_an_audit_event_and_the_usage_adds_up(chat, user):
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "2 + 3"}}]},
        {"content": "5"},
    ]
    task = finish(start(user, tools=["calc"]))
    events = list(AuditEvent.objects.filter(task=task, type="model_call").order_by("seq"))
    assert len(events) == 2
    payload = events[0].payload
    assert payload["model"] == "scripted"
    assert payload["reused"] is False
    assert payload["finish_reason"] == "tool_calls"
    assert set(payload["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert payload["duration_ms"] >= 0
    calls = ModelCall.objects.filter(task=task)
    first = calls.get(key=payload["key"]) if "key" in payload else calls.order_by("id")[0]
    # Token counts are numbers in the trail, never masked as if they were secrets.
    assert payload["usage"]["total_tokens"] == first.total_tokens > 0
    usage = task_usage(task_id=task.pk)
    assert usage["model_calls"] == 2
    assert usage["total_tokens"] == sum(c.total_tokens for c in calls) > 0
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]


def test_an_unknown_tool_or_bad_arguments_go_back_to_the_model_as_errors(chat, user):
    chat.script = [
        {"tool_calls": [{"name": "shell", "arguments": {"cmd": "ls"}}]},
        {"tool_calls": [{"name": "calc", "arguments": {"expr": "1"}}]},
        {"content": "gave up"},
    ]
    task = finish(start(user, tools=["calc"]))
    assert task.status == "completed"
    results = [m.content for m in Message.objects.filter(task=task, role="tool").order_by("seq")]
    assert results[0].startswith("error: no tool 'shell'")
    assert "args.expr" in results[1]


def test_max_steps_ends_a_model_that_never_answers(chat, user):
    chat.script = [{"tool_calls": [{"name": "calc", "arguments": {"expression": "1"}}]}]
    task = finish(start(user, tools=["calc"], max_steps=3))
    assert task.status == "failed"
    assert task.error.startswith("max_steps_exceeded")
    assert chat.count(task=task.pk) == 3


@pytest.mark.parametrize(
    ("input", "field"),
    [
        ({"prompt": 5}, "input.prompt"),
        ({"prompt": "x", "tools": ["nope"]}, "input.tools[0]"),
        (
            {"prompt": "x", "tools": ["calc"], "approve_tools": ["ledger.append"]},
            "input.approve_tools[0]",
        ),
        ({"prompt": "x", "budget": {"tokens": "many"}}, "input.budget.tokens"),
        ({"prompt": "x", "on_budget": "ask"}, "input.on_budget"),
        ({"prompt": "x", "context": {"policy": "magic"}}, "input.context.policy"),
        ({"prompt": "x", "context": {"max_messages": 0}}, "input.context.max_messages"),
        ({"prompt": "x", "temperature": 1}, "input.temperature"),
    ],
)
def test_bad_input_is_refused_naming_the_field(chat, user, input, field):
    from agents_project.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        task_start(owner=user, agent="llm", input=input)
    assert refused.value.field == field
    assert not AgentTask.objects.exists()


def test_a_token_budget_stops_the_call_that_would_pass_it(chat, user):
    chat.script = [{"tool_calls": [{"name": "calc", "arguments": {"expression": "1"}}]}]
    task = finish(start(user, tools=["calc"], budget={"tokens": 400}))
    assert task.status == "failed"
    assert task.error.startswith("budget_exceeded")
    spent = sum(c.total_tokens for c in ModelCall.objects.filter(task=task))
    # The server's prompts grow by the same amount each turn: the calibrated estimate
    # stops the call that would pass the budget.
    assert 0 < spent <= 400
    assert chat.count(task=task.pk) == ModelCall.objects.filter(task=task).count() >= 2


def test_a_cost_budget_counts_the_model_s_prices(chat, user, settings):
    settings.LLM = {**settings.LLM, "MODELS": {"scripted": {"price": {"input": 1000, "output": 0}}}}
    chat.script = [{"tool_calls": [{"name": "calc", "arguments": {"expression": "1"}}]}]
    task = finish(start(user, tools=["calc"], budget={"cost": 0.5}))
    assert task.status == "failed"
    assert "cost" in task.error and task.error.startswith("budget_exceeded")
    assert float(sum(c.cost for c in ModelCall.objects.filter(task=task))) <= 0.5


def test_a_tool_s_permanent_error_goes_back_to_the_model_not_to_the_task(chat, user):
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "2 +"}}]},
        {"content": "that expression was incomplete"},
    ]
    task = finish(start(user, tools=["calc"]))
    assert task.status == "completed", task.error
    second = chat.received(task=task.pk)[1].body["messages"]
    assert second[-1]["role"] == "tool"
    assert second[-1]["content"].startswith("error:")
    result = AuditEvent.objects.get(task=task, type="tool_result")
    assert result.payload["ok"] is False


# --- provider quirks: tool calls without an id (llama.cpp, LM Studio) ------------------------

TWO_CALLS = [
    {"name": "calc", "arguments": {"expression": "2 + 3"}},
    {"name": "calc", "arguments": {"expression": "4 * 5"}},
]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (["", ""], ["call_1_0", "call_1_1"]),  # llama.cpp
        ([None, None], ["call_1_0", "call_1_1"]),  # no id at all
        (["same", "same"], ["same", "call_1_1"]),  # a repeated id
    ],
)
def test_tool_calls_without_an_id_go_back_as_calls_with_their_results(chat, user, sent, expected):
    calls = [{**call, "id": sent[i]} for i, call in enumerate(TWO_CALLS)]
    chat.script = [{"tool_calls": calls}, {"content": "5 and 20"}]
    task = finish(start(user, tools=["calc"]))
    assert task.status == "completed", task.error
    second = chat.received(task=task.pk)[1].body["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in second[1]["tool_calls"]] == expected
    assert [m["tool_call_id"] for m in second[2:]] == expected
    assert [m["content"] for m in second[2:]] == ["5", "20"]
    assert "[called" not in (second[1]["content"] or "")
    record = ModelCall.objects.get(task=task, step=1)
    recorded = record.response["choices"][0]["message"]["tool_calls"]
    assert [c["id"] for c in recorded] == expected
    stored = Message.objects.get(task=task, role="assistant", step=1)
    assert [c["id"] for c in stored.tool_calls] == expected


def test_a_reply_recorded_without_ids_is_reused_with_the_same_ids(chat, user):
    # A record made before ids were set where a reply is recorded: the step that finds
    # it (a copy running again) uses it with the ids the recording would have given.
    chat.script = [{"content": "5 and 20"}]
    task = start(user, tools=["calc"])
    calls = [
        {"id": "", "type": "function", "function": {"name": "calc", "arguments": "{}"}},
        {"type": "function", "function": {"name": "calc", "arguments": "{}"}},
    ]
    for call, spec in zip(calls, TWO_CALLS, strict=True):
        call["function"]["arguments"] = json.dumps(spec["arguments"])
    ModelCall.objects.create(
        task=task,
        owner=user,
        step=1,
        key=f"{task.pk}:1:model",
        model="scripted",
        endpoint=chat.url,
        response={
            "id": "chatcmpl-old",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {"role": "assistant", "content": None, "tool_calls": calls},
                }
            ],
        },
        finish_reason="tool_calls",
        prompt_tokens=10,
        completion_tokens=10,
        total_tokens=20,
    )
    task = finish(task)
    assert task.status == "completed", task.error
    sent = chat.received(task=task.pk)
    assert [r.step for r in sent] == [2]
    messages = sent[0].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1_0", "call_1_1"]
    assert [m["tool_call_id"] for m in messages[2:]] == ["call_1_0", "call_1_1"]
