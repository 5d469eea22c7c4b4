"""The ``llm`` agent with MCP tools (issue 25, items 1 and 3): the model is offered each
tool with its server's JSON Schema under a wire-safe name, destructive tools wait for a
person, and the calls of one reply run at the same time, each under its own key."""

from __future__ import annotations

import json
import re

import pytest

from agents.core.suspensions import task_approve
from agents.models import AgentTask
from agents.services import task_start
from audit.models import AuditEvent
from llm.models import Message
from llm.step import wire_name
from tests.helpers import run_until_idle
from tests.tools.conftest import _forget_breakers
from tests.tools.mcp_servers import http_server
from tools.mcp import mcp_cache_clear, mcp_server_add
from tools.models import ToolCallRecord

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_breakers():
    """No breaker state from another test in, none of this one's out (the healthcheck
    of later tests reads every breaker)."""
    _forget_breakers()
    yield
    _forget_breakers()


@pytest.fixture(autouse=True)
def _fresh_mcp_cache(settings):
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}
    mcp_cache_clear()
    yield
    mcp_cache_clear()


def test_wire_names_are_safe_unique_and_readable():
    names = [
        "mcp:git/git_status",
        "mcp:a/b_c",
        "mcp:a-b/c",
        "mcp:files/read.file",
        "mcp:files/read_file",
        "mcp:x/" + "t" * 80,
        "mcp:x/" + "t" * 81,
        "ledger.append",
    ]
    wires = [wire_name(n) for n in names]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", w) for w in wires), wires
    assert len(set(wires)) == len(wires)
    assert wires[0] == "mcp__git__git_status"
    assert wires[-1] == "ledger_append"  # built-in tools keep their names


def test_a_reply_with_several_mcp_calls_runs_them_at_once_and_asks_before_destroying(
    chat, user, tmp_path, settings
):
    settings.AGENTS = {**settings.AGENTS, "TOOL_CONCURRENCY": 3}
    with http_server(tmp_path) as server:
        mcp_server_add(name="work", url=server.url, actor="test")
        gather = wire_name("mcp:work/gather")
        chat.script = [
            {
                "tool_calls": [
                    {"name": gather, "arguments": {"n": 3}},
                    {"name": wire_name("mcp:work/append"), "arguments": {"key": "a", "value": 1}},
                    {"name": gather, "arguments": {"n": 3}},
                    {"name": gather, "arguments": {"n": 3}},
                ]
            },
            {"tool_calls": [{"name": wire_name("mcp:work/erase"), "arguments": {"key": "a"}}]},
            {"content": "done"},
        ]
        tools = ["mcp:work/gather", "mcp:work/append", "mcp:work/erase"]
        task, _ = task_start(owner=user, agent="llm", input={"prompt": "go", "tools": tools})
        run_until_idle()
        task = AgentTask.objects.get(pk=task.pk)
        # erase is destructive: the task waits for a person before calling it.
        assert task.status == "suspended", task.error
        assert server.calls("erase") == []
        task_approve(task_id=task.pk, approved=True, user=user)
        run_until_idle()
        calls = server.calls()
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == "completed", task.error

    # The model saw each tool with the server's own schema.
    offered = {t["function"]["name"]: t["function"] for t in chat.requests[0].body["tools"]}
    assert offered[gather]["parameters"]["properties"]["n"]["type"] == "integer"
    assert offered[gather]["parameters"]["required"] == ["n"]

    # The three read-only gather calls were in flight together (each waits for 3), with
    # the append call alongside; each call went out once, under its own key.
    results = Message.objects.filter(task=task, role="tool").order_by("seq")
    gathered = [json.loads(m.content) for m in results if m.name == "mcp:work/gather"]
    assert gathered == [{"result": 3}] * 3
    audited_keys = [
        e.payload["idempotency_key"]
        for e in AuditEvent.objects.filter(task=task, type="tool_call").order_by("seq")
    ]
    assert sorted(c["idempotency_key"] for c in calls) == sorted(audited_keys)
    assert len(set(audited_keys)) == 5
    # Audited like every tool call, in the reply's order.
    audited = AuditEvent.objects.filter(task=task, type="tool_call").order_by("seq")
    assert [e.payload["call_index"] for e in audited] == [0, 1, 2, 3, 0]
    assert ToolCallRecord.objects.filter(task=task).count() == 5
