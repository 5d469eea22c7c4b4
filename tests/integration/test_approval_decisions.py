"""Issue 25.5 on real workers: approve, edit, reject and respond to a tool call's
approval through the API and ``manage.py approve``, for the scripted and the llm agent."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from llm.models import Message
from tests.api.conftest import token_client
from tests.helpers import wait_until
from tests.integration import llm_tools  # noqa: F401 (registers the test tools here too)
from tests.integration.llm_helpers import ended, llm_workers_start, start, status_of
from tools.models import LedgerEntry

pytestmark = pytest.mark.integration

DECISIONS = {
    "approve": ({"decision": "approve"}, []),
    "edit": ({"decision": "edit", "args": {"key": "refund", "value": 40}}, ["--edit"]),
    "reject": ({"decision": "reject", "comment": "no"}, ["--reject", "--comment", "no"]),
    "respond": ({"decision": "respond", "message": "paid by hand"}, ["--respond"]),
}


def _waiting(user) -> AgentTask:
    script = [
        {"tool": "ledger.append", "args": {"key": "refund", "value": 90}, "approve": "refund?"}
    ]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    return task


def _command_args(name: str) -> list[str]:
    body, flags = DECISIONS[name]
    if name == "edit":
        return [*flags, json.dumps(body["args"])]
    if name == "respond":
        return [*flags, body["message"]]
    return flags


@pytest.mark.parametrize("via", ["api", "command"])
def test_each_decision_on_real_workers(workers, user, via):
    workers.start(concurrency=2)
    tasks = {name: _waiting(user) for name in DECISIONS}
    wait_until(
        lambda: all(status_of(t) == TaskStatus.SUSPENDED for t in tasks.values()), timeout=60
    )
    for name, task in tasks.items():
        if via == "api":
            body = DECISIONS[name][0]
            response = token_client(user).post(
                f"/api/tasks/{task.pk}/approve/", body, format="json"
            )
            assert response.status_code == 200, response.json()
        else:
            call_command("approve", str(task.pk), *_command_args(name))
    done = {name: wait_until(lambda t=t: ended(t), timeout=60) for name, t in tasks.items()}

    def ledger(name: str) -> list:
        return list(LedgerEntry.objects.filter(task=done[name]).values_list("value", flat=True))

    assert done["approve"].status == TaskStatus.COMPLETED and ledger("approve") == [90]
    assert done["edit"].status == TaskStatus.COMPLETED and ledger("edit") == [40]
    assert done["reject"].status == TaskStatus.FAILED and ledger("reject") == []
    assert done["respond"].status == TaskStatus.COMPLETED and ledger("respond") == []
    assert done["respond"].result == "paid by hand"
    edit = AuditEvent.objects.get(task=done["edit"], type="approval_decided").payload
    assert (edit["original_args"], edit["args"]) == (
        {"key": "refund", "value": 90},
        {"key": "refund", "value": 40},
    )
    assert edit["diff"] == [{"op": "replace", "path": "/value", "value": 40}]
    assert edit["decided_by"] == (user.username if via == "api" else "cli")


def test_the_model_sees_the_edited_call_and_its_result(workers, user, chat):
    chat.script = [
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "refund", "value": 90}}]},
        {"content": "refunded 40"},
    ]
    llm_workers_start(workers, chat, gateway=False, concurrency=2)
    task = start(user, tools=["ledger.append"], approve_tools=["ledger.append"])
    wait_until(lambda: status_of(task) == TaskStatus.SUSPENDED, timeout=60)
    response = token_client(user).post(
        f"/api/tasks/{task.pk}/approve/",
        {"decision": "edit", "args": {"key": "refund", "value": 40}},
        format="json",
    )
    assert response.status_code == 200, response.json()
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert list(LedgerEntry.objects.filter(task=task).values_list("value", flat=True)) == [40]
    sent = chat.received(task=task.pk)[1].body["messages"]
    call = sent[-2]["tool_calls"][0]["function"]
    assert json.loads(call["arguments"]) == {"key": "refund", "value": 40}
    assert sent[-1]["role"] == "tool" and '"value": 40' in sent[-1]["content"]
    stored = Message.objects.get(task=task, role="assistant", tool_calls__isnull=False)
    assert json.loads(stored.tool_calls[0]["function"]["arguments"])["value"] == 40


def test_a_response_reaches_the_model_as_the_tools_result(workers, user, chat):
    chat.script = [
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "refund", "value": 90}}]},
        {"content": "ok, done by hand"},
    ]
    llm_workers_start(workers, chat, gateway=False, concurrency=2)
    task = start(user, tools=["ledger.append"], approve_tools=["ledger.append"])
    wait_until(lambda: status_of(task) == TaskStatus.SUSPENDED, timeout=60)
    call_command("approve", str(task.pk), "--respond", "refunded by hand, do not retry")
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert not LedgerEntry.objects.filter(task=task).exists()
    sent = chat.received(task=task.pk)[1].body["messages"]
    assert sent[-1] == {
        **sent[-1],
        "role": "tool",
        "content": "refunded by hand, do not retry",
    }
