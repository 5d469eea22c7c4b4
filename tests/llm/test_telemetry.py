"""Model calls as spans (``llm.telemetry``): the GenAI attributes, the opt-in content
masked like the audit trail, and a reused recorded reply marked and not counted again.

Steps run in this process from the real queue, against the scripted chat server on
loopback (``tests.agents_project.test_tracing.run_traced``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.core.scheduler import tick
from agents.errors import RetryableError
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from agents_project import tracing
from llm.models import ModelCall
from tests.tracing_helpers import run_traced, spans_in_memory
from tools.credentials import credential_set
from tools.registry import Arg, ToolContext, tool

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "sk-live-0123456789abcdef"
_failed: set[str] = set()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with spans_in_memory() as exporter:
        yield exporter


@tool("test.fails_once", args={"n": Arg(int)}, side_effects=True, max_retries=3)
def fails_once(ctx: ToolContext, args: dict[str, Any]) -> int:
    """Fails the first time per task (the step runs again), then returns ``n``."""
    if str(ctx.task_id) not in _failed:
        _failed.add(str(ctx.task_id))
        raise RetryableError("not this time")
    return int(args["n"])


def test_model_calls_are_chat_spans_and_content_is_masked_when_captured(
    user,
    chat,
    spans,
    monkeypatch,
):
    monkeypatch.setattr(tracing, "_capture_content", True)
    credential_set(owner=user, name="crm", value=SECRET, hosts=["localhost"], actor="test")
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "1 + 1"}}]},
        {"content": f"the key is {SECRET}"},
    ]
    task = task_start(
        owner=user,
        agent="llm",
        input={"prompt": "add", "tools": ["calc"]},
    )[0]
    run_traced()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED, task.error
    chats = [s for s in spans.get_finished_spans() if s.name == "chat scripted"]
    assert len(chats) == 2
    for span in chats:
        attributes = span.attributes
        assert span.kind == trace.SpanKind.CLIENT
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["gen_ai.request.model"] == "scripted"
        assert attributes["gen_ai.response.model"]
        assert attributes["gen_ai.usage.input_tokens"] > 0
        assert attributes["gen_ai.usage.output_tokens"] > 0
        assert attributes["agents.model_call.reused"] is False
    assert chats[0].attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert chats[1].attributes["gen_ai.response.finish_reasons"] == ("stop",)
    output = json.loads(chats[1].attributes["gen_ai.output.messages"])
    assert output[0]["parts"] == [{"type": "text", "content": "the key is [redacted]"}]
    sent = json.loads(chats[1].attributes["gen_ai.input.messages"])
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert SECRET not in json.dumps([dict(s.attributes) for s in spans.get_finished_spans()])


def test_a_reused_recorded_reply_is_marked_and_not_counted_again(
    user,
    chat,
    spans,
    fast_retries,
):
    chat.script = [
        {"tool_calls": [{"name": "test.fails_once", "arguments": {"n": 7}}]},
        {"content": "seven"},
    ]
    task = task_start(
        owner=user, agent="llm", input={"prompt": "seven", "tools": ["test.fails_once"]}
    )[0]
    for _ in range(50):
        run_traced()
        if AgentTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED:
            break
        time.sleep(0.05)
        tick(actor="scheduler:test")  # publishes step 1 again after its backoff
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED
    chats = [s for s in spans.get_finished_spans() if s.name == "chat scripted"]
    reused = [s for s in chats if s.attributes["agents.model_call.reused"]]
    assert (len(chats), len(reused)) == (3, 1)
    assert chat.count(task=task.pk) == 2
    assert not any(name.startswith("gen_ai.usage.") for name in reused[0].attributes)
    # Summing the spans' tokens gives what was paid for, once.
    calls = ModelCall.objects.filter(task=task)
    assert sum(s.attributes.get("gen_ai.usage.input_tokens", 0) for s in chats) == sum(
        c.prompt_tokens for c in calls
    )
    retried = next(
        s for s in spans.get_finished_spans() if s.context.span_id == reused[0].parent.span_id
    )
    assert (retried.name, retried.attributes["agents.attempt"]) == ("invoke_agent llm", 2)
