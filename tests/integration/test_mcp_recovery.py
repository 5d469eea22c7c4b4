"""Issue 25, item 3: the calls of one model reply on a real worker killed in the middle
of them. The worker dies (SIGKILL, ``AGENTS_FAULT_INJECTION=tool_recorded``) right after
the first call's result is recorded; a fresh worker runs the step again and requests only
the calls that were not recorded. The MCP server counts what it really received."""

from __future__ import annotations

import pytest

from agents.models import TaskStatus
from audit.models import AuditEvent
from tests.helpers import wait_until
from tests.integration.llm_helpers import ended, llm_env, start
from tests.tools.mcp_servers import http_server
from tools.mcp import mcp_server_add
from tools.models import ToolCallRecord

pytestmark = pytest.mark.integration


def test_a_worker_killed_between_the_calls_of_a_reply_reruns_only_the_unrecorded(
    workers, user, chat, tmp_path, settings
):
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}
    fired = tmp_path / "fired"
    with http_server(tmp_path) as server:
        mcp_server_add(name="books", url=server.url, actor="test")
        append = "mcp__books__append"
        chat.script = [
            {
                "tool_calls": [
                    {"name": append, "arguments": {"key": key, "value": value}}
                    for value, key in enumerate(("a", "b", "c"))
                ]
            },
            {"content": "booked"},
        ]
        env = llm_env(chat, AGENTS_OUTBOUND_ALLOW="127.0.0.1")
        workers.start(
            concurrency=1,
            AGENTS_FAULT_INJECTION="tool_recorded@1",
            AGENTS_FAULT_ONCE_FILE=str(fired),
            **env,
        )
        task = start(user, tools=["mcp:books/append"])
        wait_until(fired.exists, timeout=60)
        # The pool process died after recording the first call; the worker goes too.
        workers.kill(0)
        before = len(server.calls("append"))
        workers.start(concurrency=1, **env)
        task = wait_until(lambda: ended(task), timeout=120)
        calls = server.calls("append")

    assert task.status == TaskStatus.COMPLETED, task.error
    assert before == 1  # the calls with side effects run one after another, in order
    keys = [c["idempotency_key"] for c in calls]
    assert sorted(keys) == [f"{task.pk}:1:{i}" for i in range(3)]  # each requested once
    assert [c["args"]["key"] for c in calls] == ["a", "b", "c"]
    results = AuditEvent.objects.filter(task=task, type="tool_result", step=1).order_by("seq")
    assert [e.payload.get("reused", False) for e in results] == [True, False, False]
    assert AuditEvent.objects.filter(task=task, type="worker_lost", step=1).exists()
    assert ToolCallRecord.objects.filter(task=task).count() == 3
