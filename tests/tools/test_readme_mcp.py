"""The README's "MCP tools" example runs as written: its commands (against the test
database, with the reference server installed as a test dependency), then its two task
inputs, the ``scripted`` one to completion and the ``llm`` one against the scripted model."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from agents.models import AgentTask
from agents.services import task_start
from tests.helpers import run_until_idle
from tools.mcp import mcp_cache_clear
from tools.models import ToolCallRecord

pytestmark = pytest.mark.django_db(transaction=True)

README = Path(__file__).resolve().parents[2] / "README.md"


def example() -> tuple[list[str], list[dict]]:
    """The section's ``python manage.py`` commands and its JSON blocks, in order."""
    text = README.read_text()
    section = text.split("## MCP tools", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(sh|json)\n(.*?)```", section, re.S)
    commands = [
        line.split("  #", 1)[0].strip()
        for kind, body in blocks
        if kind == "sh"
        for line in body.splitlines()
        if line.startswith("python manage.py ")
    ]
    inputs = [json.loads(body) for kind, body in blocks if kind == "json"]
    return commands, inputs


def test_the_readme_mcp_example_runs(user, chat, monkeypatch, capsys):
    # The reference server is installed next to this interpreter (a test dependency), as
    # `pip install mcp-server-time` puts it on a worker's PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    monkeypatch.setenv("PATH", path)
    mcp_cache_clear()
    commands, (scripted, llm) = example()
    assert commands[0].startswith("python manage.py mcp_servers add time")
    for command in commands:
        call_command(*shlex.split(command)[2:])
    assert "mcp:time/get_current_time" in capsys.readouterr().out

    # Two calls in one reply: they run at once (tools.runner), each recorded.
    chat.script = [
        {
            "tool_calls": [
                {"name": "mcp__time__get_current_time", "arguments": {"timezone": "Europe/Paris"}},
                {"name": "mcp__time__get_current_time", "arguments": {"timezone": "Asia/Tokyo"}},
            ]
        },
        {"content": "It is late in Paris and early in Tokyo."},
    ]
    tasks = [
        task_start(owner=user, agent="scripted", input=scripted)[0],
        task_start(owner=user, agent="llm", input=llm)[0],
    ]
    run_until_idle()
    first, second = (AgentTask.objects.get(pk=t.pk) for t in tasks)
    assert first.status == "completed", first.error
    assert first.result["timezone"] == "Europe/Paris"
    assert second.status == "completed", second.error
    assert second.result == {"answer": "It is late in Paris and early in Tokyo."}
    results = [m for m in chat.received(task=second.pk)[1].body["messages"] if m["role"] == "tool"]
    assert ["Europe/Paris" in r["content"] for r in results] == [True, False]
    assert "Asia/Tokyo" in results[1]["content"]
    keys = ToolCallRecord.objects.filter(task=second).values_list("idempotency_key", flat=True)
    assert sorted(keys) == [f"{second.pk}:1:0", f"{second.pk}:1:1"], "each call recorded"
    mcp_cache_clear()
