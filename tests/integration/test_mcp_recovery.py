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
from tests.tools.conftest import _forget_breakers
from tests.tools.mcp_servers import TIME_SERVER, http_server
from tools.mcp import mcp_server_add
from tools.models import ToolCallRecord


def test_a_real_worker_calls_a_stdio_server(workers, user):
    """A worker (whose sys.stderr Celery replaced with a logging proxy) starts the
    reference time server over stdio for the call."""
    from agents.services import task_start

    mcp_server_add(name="time", command=TIME_SERVER, actor="test")
    workers.start(concurrency=1)
    task, _ = task_start(
        owner=user,
        agent="scripted",
        input={"script": [{"tool": "mcp:time/get_current_time", "args": {"timezone": "UTC"}}]},
    )
    task = wait_until(lambda: ended(task), timeout=90)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result["timezone"] == "UTC"


pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh_breakers():
    """No breaker state from another test in, none of this one's out (the healthcheck
    of later tests reads every breaker)."""
    _forget_breakers()
    yield
    _forget_breakers()


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


def test_read_only_calls_in_flight_together_when_the_worker_dies_run_again_only_unrecorded(
    workers, user, chat, tmp_path, settings
):
    """Three read-only calls run at once (the server holds each until all three are in
    flight); the worker dies right after the first result is recorded. Each call is then
    requested exactly once more if it was not recorded before the death, never if it was."""
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}
    fired = tmp_path / "fired"
    with http_server(tmp_path) as server:
        mcp_server_add(name="index", url=server.url, actor="test")
        chat.script = [
            {"tool_calls": [{"name": "mcp__index__gather", "arguments": {"n": 3}}] * 3},
            {"content": "gathered"},
        ]
        env = llm_env(chat, AGENTS_OUTBOUND_ALLOW="127.0.0.1", AGENTS_TOOL_CONCURRENCY="3")
        workers.start(
            concurrency=1,
            AGENTS_FAULT_INJECTION="tool_recorded@1",
            AGENTS_FAULT_ONCE_FILE=str(fired),
            **env,
        )
        task = start(user, tools=["mcp:index/gather"])
        wait_until(fired.exists, timeout=60)
        workers.kill(0)
        workers.start(concurrency=1, **env)
        task = wait_until(lambda: ended(task), timeout=120)
        calls = server.calls("gather")

    assert task.status == TaskStatus.COMPLETED, task.error
    records = {r.idempotency_key for r in ToolCallRecord.objects.filter(task=task)}
    assert sorted(records) == [f"{task.pk}:1:{i}" for i in range(3)]
    # A call recorded before the death is reused by the step's second run (its
    # tool_result says so); the others were requested again.
    results = AuditEvent.objects.filter(task=task, type="tool_result", step=1)
    reused = {f"{task.pk}:1:{e.payload['call_index']}" for e in results if e.payload.get("reused")}
    assert reused  # the death came after a recording
    requested = [c["idempotency_key"] for c in calls]
    for key in records:
        assert requested.count(key) == (1 if key in reused else 2), (key, requested)
