"""Traces in one process: off costs no span; on, a task is one trace of the GenAI shape.

Steps run in this process from the real queue (as ``tests.helpers.run_until_idle``
does, passing each message's ``traceparent`` as the worker does); spans go to the SDK's
in-memory exporter. The OTLP export between real processes is
``tests/integration/test_tracing.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.core.scheduler import tick
from agents.core.suspensions import task_approve
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from agents_project import tracing
from agents_project.logs import _SHARED
from tests.helpers import WORK_QUEUE, broker, run_until_idle
from tests.tracing_helpers import run_traced, spans_in_memory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with spans_in_memory() as exporter:
        yield exporter


def _counted(init, created):
    def counted(self, *args, **kwargs):
        created.append(self)
        init(self, *args, **kwargs)

    return counted


def test_with_tracing_off_a_task_creates_no_span_and_carries_no_context(user, monkeypatch):
    created: list[object] = []
    for kind in (SdkSpan, trace.NonRecordingSpan):
        monkeypatch.setattr(kind, "__init__", _counted(kind.__init__, created))
    assert not tracing.ENABLED and tracing.tracer() is None
    task = task_start(
        owner=user,
        agent="scripted",
        input={"script": [{"tool": "calc", "args": {"expression": "2 * 3"}}, {"final": "6"}]},
    )[0]
    with broker() as conn:
        message = WORK_QUEUE(conn.default_channel).get(no_ack=False)
        assert "traceparent" not in message.headers
        message.requeue()
    run_until_idle()

    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert (task.trace_context, task.trace_id) == ("", "")
    assert created == []
    # No SDK provider was ever installed: the API's global one is still its proxy.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def test_a_task_through_an_approval_is_one_trace_of_steps_and_tools(user, spans):
    task = task_start(
        owner=user,
        agent="scripted",
        input={
            "script": [
                {"tool": "calc", "args": {"expression": "2 * 3"}},
                {"approval": "go on?"},
                {"final": "6"},
            ]
        },
    )[0]
    run_traced()
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.SUSPENDED
    # The approval comes from elsewhere (another trace, or none): the next step still
    # joins the task's trace, through the context kept on the task row.
    task_approve(task_id=task.pk, user=user, approved=True)
    run_traced()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED

    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    root = next(s for s in finished if s.name == "task_start scripted")
    trace_id = root.context.trace_id
    assert task.trace_id == format(trace_id, "032x")
    steps = sorted(
        (s for s in finished if s.name == "invoke_agent scripted"),
        key=lambda s: s.attributes["agents.step"],
    )
    assert [s.attributes["agents.step"] for s in steps] == [1, 2, 3]
    assert {s.context.trace_id for s in finished} == {trace_id}, [
        (s.name, s.context.trace_id) for s in finished
    ]
    for step in steps:
        assert step.kind == trace.SpanKind.CONSUMER
        assert step.attributes["agents.task.id"] == str(task.pk)
        assert step.attributes["gen_ai.agent.name"] == "scripted"
        assert step.attributes["agents.attempt"] == 1
        assert step.attributes["agents.agent.version"] == task.agent_version
    # Across the queue: each step is the child of the step that published it; after the
    # suspension, of the task's own span.
    assert steps[0].parent.span_id == root.context.span_id
    assert steps[1].parent.span_id == steps[0].context.span_id
    assert steps[2].parent.span_id == root.context.span_id
    assert [e.name for e in steps[1].events] == ["agents.task.suspended"]
    assert steps[1].events[0].attributes["agents.wait.kind"] == "approval"
    resumed = [e for e in steps[2].events if e.name == "agents.task.resumed"]
    assert resumed and resumed[0].attributes["agents.approval.approved"] is True
    tool = next(s for s in finished if s.name == "execute_tool calc")
    assert by_id[tool.parent.span_id] is steps[0]
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.call.id"] == f"{task.pk}:1:0"


def test_a_failed_step_is_an_error_on_its_span(user, spans, fast_retries):
    task = task_start(
        owner=user,
        agent="scripted",
        input={"script": [{"fail": "the backend is down", "times": 1}, {"final": "ok"}]},
    )[0]
    for _ in range(50):
        run_traced()
        if AgentTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED:
            break
        time.sleep(0.05)
        tick(actor="scheduler:test")  # publishes the retry, once its backoff passed
    steps = [s for s in spans.get_finished_spans() if s.name == "invoke_agent scripted"]
    failed = [s for s in steps if s.status.status_code == trace.StatusCode.ERROR]
    assert len(failed) == 1
    assert "the backend is down" in failed[0].status.description
    assert [e.name for e in failed[0].events] == ["exception"]
    retried = next(s for s in steps if s.attributes["agents.attempt"] == 2)
    # Published by the scheduler, which is in no trace: joined through the task row.
    assert retried.context.trace_id == failed[0].context.trace_id
    assert retried.status.status_code != trace.StatusCode.ERROR


def test_step_parent_keeps_the_task_trace():
    stored = "00-" + "a" * 32 + "-" + "1" * 16 + "-01"
    same = "00-" + "a" * 32 + "-" + "2" * 16 + "-01"
    other = "00-" + "b" * 32 + "-" + "3" * 16 + "-01"
    assert tracing.step_parent(stored=stored, received=same) == (same, [])
    assert tracing.step_parent(stored=stored, received=other) == (stored, [other])
    assert tracing.step_parent(stored=stored, received="") == (stored, [])
    assert tracing.step_parent(stored="", received=other) == (other, [])
    assert tracing.step_parent(stored="", received="") == ("", [])


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({}, ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"},
            "http://t:4318/v1/traces",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, ""),
    ],
)
def test_tracing_is_on_only_with_an_endpoint(environ, endpoint):
    assert tracing.configured_endpoint(environ) == endpoint


def test_a_log_line_about_a_task_gets_the_trace_id(spans):
    add = next(p for p in _SHARED if p is tracing.add_trace_id)
    with tracing.span("outer") as current:
        assert current is not None
        line = add(None, "info", {"event": "x", "task_id": "t"})
        unrelated = add(None, "info", {"event": "y"})
    assert line["trace_id"] == format(current.get_span_context().trace_id, "032x")
    assert "trace_id" not in unrelated
