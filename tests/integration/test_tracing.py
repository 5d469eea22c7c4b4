"""One task, one trace: a real web process (uvicorn) and a real worker (and, on one
path, the model gateway) export OTLP over HTTP to a receiver on loopback, which decodes
what they send with ``opentelemetry-proto`` (``tests.integration.otlp_receiver``).

The task is an ``llm`` task against the scripted chat server: the model asks for a tool
that needs an approval, the task suspends, an operator approves through the API (a
request of its own trace), the tool runs, the model answers. The test reads the tree.
"""

from __future__ import annotations

import json

import httpx
import pytest
from rest_framework.authtoken.models import Token

from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.permissions import operator_group_ensure
from agents_project.tracing import CONTENT_VARIABLE
from tests.helpers import wait_until
from tests.integration.llm_helpers import llm_env, llm_workers_start
from tests.integration.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.integration.uvicorn import uvicorn_running
from tools.credentials import credential_set

pytestmark = pytest.mark.integration

SECRET = "sk-live-otel-0123456789abcdef"
CHAT_ATTRIBUTES = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
)
CONTENT_ATTRIBUTES = ("gen_ai.input.messages", "gen_ai.output.messages")


@pytest.fixture
def staff_user(django_user_model):
    olga = django_user_model.objects.create_user(username="olga", password="pw", is_staff=True)
    olga.groups.add(operator_group_ensure())
    return olga


def _auth(user) -> dict[str, str]:
    return {"Authorization": f"Token {Token.objects.get_or_create(user=user)[0].key}"}


def _status(task_id: str) -> str:
    return AgentTask.objects.values_list("status", flat=True).get(pk=task_id)


@pytest.mark.parametrize(
    ("gateway", "content"),
    [(False, False), (False, True), (True, False)],
    ids=["in-the-worker", "content-captured", "through-the-gateway"],
)
def test_a_task_is_one_trace_from_the_api_request_to_its_last_step(
    workers, user, staff_user, chat, gateway, content
):
    credential_set(owner=user, name="crm", value=SECRET, hosts=["localhost"], actor="test")
    chat.script = [
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "refund", "value": 40}}]},
        {"content": f"refunded 40 (the key was {SECRET})"},
    ]
    with otlp_receiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        if content:
            otel[CONTENT_VARIABLE] = "true"
        llm_workers_start(workers, chat, gateway=gateway, OTEL_SERVICE_NAME="agents-worker", **otel)
        with uvicorn_running(**llm_env(chat), OTEL_SERVICE_NAME="agents-web", **otel) as web:
            created = httpx.post(
                f"{web.url}/api/tasks/",
                json={
                    "agent": "llm",
                    "input": {
                        "prompt": "refund 40",
                        "tools": ["ledger.append"],
                        "approve_tools": ["ledger.append"],
                    },
                },
                headers=_auth(user),
                timeout=30,
            )
            assert created.status_code == 201, created.text
            task_id = created.json()["id"]
            wait_until(lambda: _status(task_id) == TaskStatus.SUSPENDED, timeout=60)
            approved = httpx.post(
                f"{web.url}/api/tasks/{task_id}/approve/",
                json={"approved": True},
                headers=_auth(staff_user),
                timeout=30,
            )
            assert approved.status_code == 200, approved.text
            wait_until(lambda: _status(task_id) == TaskStatus.COMPLETED, timeout=60)
            detail = httpx.get(f"{web.url}/api/tasks/{task_id}/", headers=_auth(user), timeout=30)
            last = Checkpoint.objects.filter(task_id=task_id).order_by("-step").first()
            assert last is not None

            def last_step_exported() -> bool:
                return any(
                    s.name == "invoke_agent llm"
                    and s.attributes["agents.step"] == last.step
                    and s.attributes.get("agents.step.result") == "committed"
                    for s in receiver.received()
                )

            wait_until(last_step_exported, timeout=30)
        spans = receiver.received()

    trace_id = detail.json()["trace_id"]
    assert len(trace_id) == 32
    ours = [s for s in spans if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in ours}

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        assert span.parent_id in by_id, f"{span.name}'s parent is not in the trace"
        return by_id[span.parent_id]

    # The API request is the root; the task's span its child, in the web process.
    request = next(s for s in ours if s.name == "POST /api/tasks/")
    assert (request.kind, request.parent_id, request.service) == ("SERVER", "", "agents-web")
    assert request.attributes["http.response.status_code"] == 201
    task_span = next(s for s in ours if s.name == "task_start llm")
    assert parent(task_span) is request
    # Every step is in the trace, from the first to the last, each with its attributes.
    steps = sorted(
        (s for s in ours if s.name == "invoke_agent llm"),
        key=lambda s: (s.attributes["agents.step"], s.parent_id != task_span.span_id),
    )
    assert {s.attributes["agents.step"] for s in steps} == set(range(1, last.step + 1))
    for step in steps:
        assert step.service == "agents-worker" and step.kind == "CONSUMER"
        assert step.attributes["agents.task.id"] == task_id
        assert step.attributes["gen_ai.agent.name"] == "llm"
        assert step.attributes["agents.attempt"] >= 1
        assert step.attributes["agents.agent.version"]
        assert not step.error
    # Across the queue: step 1 is the child of the web process's task span.
    assert parent(steps[0]) is task_span
    # Across the suspension: the step that suspended says so; the step the approval
    # resumed is in the same trace, under the task's span, linked to the approval's
    # request (a trace of its own), and says it resumed.
    suspended = [s for s in steps if any(e[0] == "agents.task.suspended" for e in s.events)]
    resumed = [s for s in steps if any(e[0] == "agents.task.resumed" for e in s.events)]
    assert len(suspended) == 1 and len(resumed) == 1
    assert parent(resumed[0]) is task_span
    approval = next(s for s in spans if s.name == "POST /api/tasks/{pk}/approve/")
    assert approval.trace_id != trace_id
    assert resumed[0].links == [(approval.trace_id, approval.span_id)]
    # Model calls: a CLIENT span each, with the GenAI attributes, under a step (in the
    # worker) or under the handing-off step (in the gateway, whose span the step that
    # takes the reply back continues).
    chats = [s for s in ours if s.name == "chat scripted"]
    assert len(chats) == 2
    for call in chats:
        assert call.kind == "CLIENT"
        assert all(name in call.attributes for name in CHAT_ATTRIBUTES), call.attributes
        assert call.attributes["gen_ai.operation.name"] == "chat"
        assert call.attributes["gen_ai.request.model"] == "scripted"
        assert call.attributes["gen_ai.usage.input_tokens"] > 0
        assert call.attributes["agents.model_call.reused"] is False
        assert parent(call).name == "invoke_agent llm"
        if gateway:
            assert any(s.parent_id == call.span_id for s in steps), "no step continues it"
    assert sorted(c.attributes["gen_ai.response.finish_reasons"] for c in chats) == [
        ("stop",),
        ("tool_calls",),
    ]
    tool = next(s for s in ours if s.name == "execute_tool ledger.append")
    assert parent(tool) in resumed
    # Content only when asked for, and then never the credential.
    exported = json.dumps([s.attributes for s in spans], default=str)
    assert SECRET not in exported
    captured = [name for c in chats for name in CONTENT_ATTRIBUTES if name in c.attributes]
    if content:
        assert len(captured) == 4
        answer = next(
            c for c in chats if c.attributes["gen_ai.response.finish_reasons"] == ("stop",)
        )
        output = json.loads(answer.attributes["gen_ai.output.messages"])
        assert output[0]["parts"][0]["content"] == "refunded 40 (the key was [redacted])"
    else:
        assert captured == []
    # Every log line the worker wrote about the task names its trace (through the
    # gateway, the worker's steps log nothing about it).
    lines = [
        line
        for path, _ in workers.logs
        for line in path.read_text(errors="replace").splitlines()
        if f"task_id='{task_id}'" in line
    ]
    assert lines or gateway
    untraced = [line for line in lines if f"trace_id='{trace_id}'" not in line]
    assert untraced == [], trace_id
