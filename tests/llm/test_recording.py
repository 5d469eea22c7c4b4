"""A model call is recorded as soon as it answers and never made twice for a step.

The step is run once by hand up to its outcome (as a worker that dies before the commit
would), then by the engine: the server sees one request for that step, the engine's
copy uses the recorded response (``reused``), and the tool keys are the same.
"""

from __future__ import annotations

import pytest

from agents.definition import CallTools, StepContext, get_agent
from agents.models import AgentTask, Checkpoint
from agents.services import task_start
from audit.models import AuditEvent
from llm.models import ModelCall
from tests.helpers import run_until_idle
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_step_that_runs_again_reuses_the_recorded_response(chat, user):
    chat.script = [
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "k", "value": 1}}]},
        {"content": "recorded"},
    ]
    task, _ = task_start(
        owner=user, agent="llm", input={"prompt": "record it", "tools": ["ledger.append"]}
    )
    checkpoint = Checkpoint.objects.get(task=task, step=0)
    lost_copy = get_agent("llm").step(
        StepContext(
            task_id=task.pk,
            step=1,
            attempt=1,
            input=task.input,
            state=checkpoint.state,
            owner_id=task.owner_id,
        )
    )
    assert isinstance(lost_copy, CallTools)
    assert chat.count(task=task.pk, step=1) == 1

    run_until_idle()
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == "completed"
    assert chat.count(task=task.pk, step=1) == 1
    assert ModelCall.objects.filter(task=task, step=1).count() == 1
    event = AuditEvent.objects.get(task=task, type="model_call", step=1)
    assert event.payload["reused"] is True
    call = AuditEvent.objects.get(task=task, type="tool_call", step=1)
    assert call.payload["args"] == dict(lost_copy.calls[0].args)
    assert LedgerEntry.objects.filter(task=task).count() == 1


def test_usage_counts_a_reused_response_once(chat, user):
    chat.script = [{"content": "once"}]
    task, _ = task_start(owner=user, agent="llm", input={"prompt": "hi"})
    checkpoint = Checkpoint.objects.get(task=task, step=0)
    get_agent("llm").step(
        StepContext(
            task_id=task.pk,
            step=1,
            attempt=1,
            input=task.input,
            state=checkpoint.state,
            owner_id=task.owner_id,
        )
    )
    run_until_idle()
    from llm.selectors import task_usage

    assert task_usage(task_id=task.pk)["model_calls"] == 1
    assert chat.count(task=task.pk) == 1
