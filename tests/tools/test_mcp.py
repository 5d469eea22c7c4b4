"""MCP tool servers as tools (issue 25, item 1): the reference servers from PyPI over
stdio (``mcp-server-time``, ``mcp-server-git`` on a temporary repository) and the tests'
own streamable-HTTP server, driven through real tasks on the real queue."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from agents.core.suspensions import task_approve
from agents.models import AgentTask
from agents.services import task_start
from agents_project.errors import Conflict, InvalidInput
from audit.models import AuditEvent
from tests.helpers import run_until_idle
from tests.tools.mcp_servers import GIT_SERVER, TIME_SERVER, git_repository, http_server
from tools.credentials import credential_set
from tools.mcp import mcp_cache_clear, mcp_server_add
from tools.models import McpServer, ToolCallRecord
from tools.registry import find_tool

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_mcp_cache():
    mcp_cache_clear()
    yield
    mcp_cache_clear()


@pytest.fixture
def loopback(settings):
    """The tests' HTTP server is on 127.0.0.1, which the outbound policy refuses unless
    the deployment lists it."""
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}


def scripted(owner, *steps):
    task, _ = task_start(owner=owner, agent="scripted", input={"script": list(steps)})
    return task


def finished(task):
    run_until_idle()
    return AgentTask.objects.get(pk=task.pk)


def test_the_time_server_over_stdio_is_a_tool_of_every_owner(user, other_user):
    call_command("mcp_servers", "add", "time", "--command", TIME_SERVER)
    server = McpServer.objects.get(name="time")
    assert {t["name"] for t in server.tools} >= {"get_current_time", "convert_time"}
    tool = find_tool("mcp:time/get_current_time", owner_id=other_user.pk)
    assert tool is not None and tool.parallel and not tool.needs_approval

    task = scripted(
        user, {"tool": "mcp:time/get_current_time", "args": {"timezone": "Europe/Paris"}}
    )
    task = finished(task)
    assert task.status == "completed", task.error
    assert task.result["timezone"] == "Europe/Paris"
    events = AuditEvent.objects.filter(task=task, type__in=["tool_call", "tool_result"])
    call, result = events.order_by("seq")
    assert call.payload["tool"] == "mcp:time/get_current_time"
    assert call.payload["idempotency_key"] == f"{task.pk}:1:0"
    assert result.payload["ok"] is True
    # Recorded under its idempotency key, as every MCP call is.
    assert ToolCallRecord.objects.filter(idempotency_key=f"{task.pk}:1:0", ok=True).count() == 1


def test_arguments_are_checked_against_the_servers_schema_before_anything_is_sent(user):
    mcp_server_add(name="time", command=TIME_SERVER, actor="test")
    with pytest.raises(InvalidInput) as refused:
        scripted(user, {"tool": "mcp:time/no_such_tool", "args": {}})
    assert refused.value.field == "input.script[0].tool"
    task = finished(scripted(user, {"tool": "mcp:time/get_current_time", "args": {"tz": 1}}))
    assert task.status == "failed"
    assert "args" in task.error and "timezone" in task.error
    assert ToolCallRecord.objects.filter(task=task).count() == 0


def test_the_git_server_on_a_temporary_repository_and_destructive_tools_need_approval(
    user, tmp_path
):
    repo = git_repository(tmp_path / "repo")
    call_command("mcp_servers", "add", "git", "--command", f"{GIT_SERVER} --repository {repo}")
    (repo / "NOTES").write_text("a note\n")
    args = {"repo_path": str(repo)}
    task = finished(
        scripted(
            user,
            {"tool": "mcp:git/git_add", "args": {**args, "files": ["NOTES"]}},
            {"tool": "mcp:git/git_commit", "args": {**args, "message": "add notes"}},
            {"tool": "mcp:git/git_reset", "args": args},
            {"tool": "mcp:git/git_log", "args": {**args, "max_count": 5}},
        )
    )
    # git_reset is marked destructive: the task waits for a person before calling it.
    assert task.status == "suspended"
    log = subprocess.run(
        ["git", "log", "--format=%s"], cwd=repo, capture_output=True, text=True, check=True
    )
    assert log.stdout.split("\n")[:2] == ["add notes", "first"]
    assert ToolCallRecord.objects.filter(task=task, tool="mcp:git/git_reset").count() == 0
    task_approve(task_id=task.pk, approved=True, user=user, comment="ok")
    task = finished(task)
    assert task.status == "completed", task.error
    assert "add notes" in json.dumps(task.result)
    assert ToolCallRecord.objects.filter(task=task).count() == 4


def test_an_owners_server_is_seen_by_that_owners_tasks_only(user, other_user, tmp_path):
    mcp_server_add(name="mytime", command=TIME_SERVER, owner=user, actor="test")
    assert find_tool("mcp:mytime/get_current_time", owner_id=user.pk) is not None
    assert find_tool("mcp:mytime/get_current_time", owner_id=other_user.pk) is None
    with pytest.raises(InvalidInput) as refused:
        scripted(other_user, {"tool": "mcp:mytime/get_current_time", "args": {}})
    assert "unknown tool" in refused.value.message
    with pytest.raises(Conflict):
        mcp_server_add(name="mytime", command=TIME_SERVER, owner=user, actor="test")


def test_bad_registrations_name_the_field_and_write_nothing(user, tmp_path):
    cases = [
        ({"name": "bad_name", "command": TIME_SERVER}, "name"),
        ({"name": "x", "command": TIME_SERVER, "url": "http://example.com/mcp"}, "command"),
        ({"name": "x", "url": "http://127.0.0.1:9/mcp"}, "url"),  # the outbound policy
        ({"name": "x", "command": str(tmp_path / "missing-server")}, "command"),
        ({"name": "x", "command": TIME_SERVER, "headers": ["Authorization=tok"]}, "headers"),
        ({"name": "x", "command": TIME_SERVER, "approve": "sometimes"}, "approve"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidInput) as refused:
            mcp_server_add(actor="test", **kwargs)
        assert refused.value.field == field, (kwargs, refused.value.message)
    assert McpServer.objects.count() == 0
    with pytest.raises(CommandError, match="no user"):
        call_command("mcp_servers", "add", "x", "--command", TIME_SERVER, "--owner", "nobody")


def test_http_server_with_each_owners_credential_as_its_header(
    user, other_user, loopback, tmp_path
):
    with http_server(tmp_path) as server:
        call_command(
            "mcp_servers",
            "add",
            "tracker",
            "--url",
            server.url,
            "--header",
            "Authorization=tracker_token",
        )
        # A credential is bound to host names, not addresses: bound to any host here.
        for owner, token in ((user, "Bearer alice-secret"), (other_user, "Bearer bob-secret")):
            credential_set(
                owner=owner, name="tracker_token", value=token, any_host=True, actor="test"
            )
        tasks = [
            scripted(owner, {"tool": "mcp:tracker/whoami", "args": {}})
            for owner in (user, other_user)
        ]
        run_until_idle()
        calls = server.calls("whoami")
    statuses = [AgentTask.objects.get(pk=t.pk).status for t in tasks]
    assert statuses == ["completed", "completed"]
    # Discovery (at the first lookup) and each call went with the caller's own token.
    assert sorted(c["authorization"] for c in calls) == [
        "Bearer alice-secret",
        "Bearer bob-secret",
    ]
    # whoami answers with the header it got: the trail shows it masked, never the value.
    for task in tasks:
        trail = json.dumps(list(AuditEvent.objects.filter(task=task).values("payload")))
        assert "alice-secret" not in trail and "bob-secret" not in trail
        assert "[redacted]" in trail
        assert "secret" not in json.dumps(AgentTask.objects.get(pk=task.pk).result)


def test_a_recorded_call_is_never_requested_twice(user, loopback, tmp_path):
    with http_server(tmp_path) as server:
        mcp_server_add(name="counter", url=server.url, actor="test")
        task = finished(
            scripted(
                user,
                {"tool": "mcp:counter/append", "args": {"key": "k", "value": 1}},
                {"fail": "after the call", "times": 2},
                {"final": "done"},
            )
        )
        assert task.status == "completed", task.error
        # Replaying step 1's tool call (its record exists) asks the server nothing.
        from tools.registry import ToolCall
        from tools.runner import ToolRun, tools_run

        run = ToolRun(task_id=task.pk, owner_id=user.pk, step=1, events=[])
        [result] = tools_run(run, [ToolCall("mcp:counter/append", {"key": "k", "value": 1})])
        assert result.value == {"key": "k", "value": 1}
        assert run.events[-1][1]["reused"] is True
        calls = server.calls("append")
    assert len(calls) == 1
    assert calls[0]["idempotency_key"] == f"{task.pk}:1:0"


def test_a_server_that_dies_mid_call_is_retried_through_its_breaker(
    user, loopback, tmp_path, fast_retries, settings
):
    settings.AGENTS = {**settings.AGENTS, "BREAKER_RESET_TIMEOUT": 0.5}
    with http_server(tmp_path) as server:
        mcp_server_add(name="fragile", url=server.url, timeout=5, actor="test")
        marker = tmp_path / "died"
        task = scripted(user, {"tool": "mcp:fragile/die", "args": {"marker": str(marker)}})
        # A supervisor brings the server back when it exits, as a deployment's would.
        supervisor = threading.Thread(target=lambda: (server.process.wait(), server.start()))
        supervisor.start()
        task = finished(task)
        supervisor.join(timeout=30)
        calls = server.calls("die")
    assert marker.exists()
    assert task.status == "completed", task.error
    assert task.result == {"result": "survived"}
    # The call the server died in was not recorded, so it was made again, once; the
    # attempts while the server was down never reached it.
    assert len(calls) == 2
    failed = AuditEvent.objects.filter(task=task, type="tool_result", payload__ok=False)
    first = failed.order_by("seq").first()
    assert first is not None
    assert first.payload["error_type"] == "McpUnavailable"
    assert first.payload["breaker"] == "mcp:fragile"
    assert ToolCallRecord.objects.filter(task=task).count() == 1


def test_mcp_servers_list_and_remove(user, capsys):
    call_command("mcp_servers", "add", "time", "--command", TIME_SERVER, "--owner", "alice")
    capsys.readouterr()
    call_command("mcp_servers", "list", "--json")
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["owner"] == "alice" and listed["transport"] == "stdio"
    assert "mcp:time/get_current_time" in listed["tools"]
    call_command("mcp_servers", "remove", "time", "--owner", "alice")
    assert McpServer.objects.count() == 0
    with pytest.raises(CommandError, match="name: no MCP server"):
        call_command("mcp_servers", "remove", "time", "--owner", "alice")


def test_each_call_passes_the_outbound_policy_and_a_rejected_destructive_call_is_never_made(
    user, loopback, tmp_path, settings
):
    with http_server(tmp_path) as server:
        mcp_server_add(name="store", url=server.url, actor="test")
        erase = scripted(user, {"tool": "mcp:store/erase", "args": {"key": "k"}})
        run_until_idle()
        task_approve(task_id=erase.pk, approved=False, user=user, comment="keep it")
        erase = finished(erase)
        # The deployment stops allowing the server's address: its next call is refused.
        settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": []}
        echo = finished(scripted(user, {"tool": "mcp:store/echo", "args": {"text": "hi"}}))
        calls = server.calls()
    assert erase.status == "failed"
    assert echo.status == "failed"
    assert "non-public address" in echo.error
    assert [c["tool"] for c in calls] == []  # neither call reached the server
    assert ToolCallRecord.objects.count() == 0


def test_the_admin_lists_servers_and_their_tools_and_adds_none(admin_client, user):
    server = mcp_server_add(name="time", command=TIME_SERVER, owner=user, actor="test")
    listing = admin_client.get("/admin/tools/mcpserver/")
    detail = admin_client.get(f"/admin/tools/mcpserver/{server.pk}/change/")
    for response in (listing, detail):
        assert response.status_code == 200
        assert "time" in response.content.decode()
    assert "get_current_time" in detail.content.decode()
    assert admin_client.get("/admin/tools/mcpserver/add/").status_code == 403
