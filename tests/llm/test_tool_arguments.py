"""Issue 22, item 9: a model's tool call that leaves out optional arguments runs.

The ``llm`` agent validates a model's arguments (filling each default) and the tool
runner validates the filled arguments again; both must agree. One case per built-in
tool, each called with only its required arguments, through the real agent and a
scripted chat-completions server."""

from __future__ import annotations

import pytest

from agents.models import AgentTask
from agents.services import task_start
from audit.models import AuditEvent
from llm.models import Message
from tests.helpers import run_until_idle
from tests.tools.flaky_server import FlakyServer
from tools.registry import registered_tools

pytestmark = pytest.mark.django_db(transaction=True)

# Only the required arguments of each built-in tool.
REQUIRED_ONLY = {
    "calc": {"expression": "2 + 3"},
    "ledger.append": {"key": "k", "value": 5},
    "http.get": {"url": "{flaky}"},
    "kv.set": {"key": "k", "value": 5},
    "kv.get": {"key": "k"},
}


def builtin_tools() -> list[str]:
    return sorted(n for n, t in registered_tools().items() if t.func.__module__ == "tools.builtin")


def test_every_built_in_tool_has_a_case():
    assert sorted(REQUIRED_ONLY) == builtin_tools()
    for name, args in REQUIRED_ONLY.items():
        required = {a for a, spec in registered_tools()[name].args.items() if spec.required}
        assert set(args) == required, name


@pytest.mark.parametrize("name", sorted(REQUIRED_ONLY))
def test_a_model_call_with_only_the_required_arguments_runs(chat, user, settings, name):
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}
    flaky = FlakyServer().start()
    try:
        args = {
            k: (flaky.url("/") if v == "{flaky}" else v) for k, v in REQUIRED_ONLY[name].items()
        }
        chat.script = [
            {"tool_calls": [{"name": name, "arguments": args}]},
            {"content": "done"},
        ]
        task, _ = task_start(
            owner=user, agent="llm", input={"prompt": "use the tool", "tools": [name]}
        )
        run_until_idle()
    finally:
        flaky.stop()
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == "completed", task.error
    [result] = Message.objects.filter(task=task, role="tool").values_list("content", flat=True)
    assert not result.startswith("error"), result
    [event] = AuditEvent.objects.filter(task=task, type="tool_result")
    assert event.payload.get("ok", True), event.payload


def test_validating_filled_arguments_again_changes_nothing_and_bad_defaults_are_refused():
    from tools.registry import Arg, tool

    for name, args in REQUIRED_ONLY.items():
        spec = registered_tools()[name]
        filled = spec.validate(args)
        assert spec.validate(filled) == filled, name
    with pytest.raises(ValueError, match="default of argument 'n'"):
        tool("test.bad-default", args={"n": Arg(int, required=False, default="3")})(
            lambda ctx, args: None
        )
