"""What a model call through the gateway costs the worker: counted, never timed.

The delivery that takes a recorded reply back runs the reply's tools and prepares the
next request: it reads the conversation once (for the next request; the reply is not
planned again), the recorded reply once (the next request, which follows in the same
delivery, cannot have one), stores only the messages the hand-off did not, and writes
the task row twice: its claim, then one statement that
stores the checkpoint and audit events and passes the lease to the hand-off queue, in
the transaction that publishes the hand-off. The gateway's part is played here by its
own functions (claim, record, return), against the scripted chat server through the
real SDK.
"""

from __future__ import annotations

import json

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from kombu import Connection

from agents.core.engine import step_execute
from agents.core.handoffs import handoff_claim, handoff_return
from agents.core.leases import lease_owner_name
from agents.core.results import StepResult
from agents.models import AgentTask, Checkpoint
from agents.services import task_start
from agents_project.topology import handoff_queue
from audit.integrity import audit_chain_verify
from audit.models import AuditEvent
from llm.client import chat_complete, model_config
from llm.gateway import recorded_note
from llm.models import ModelCall
from llm.services import model_call_record

pytestmark = pytest.mark.django_db(transaction=True)


def _purge_hand_offs() -> None:
    with Connection(django_settings.CELERY_BROKER_URL) as broker:
        handoff_queue(django_settings.AGENTS)(broker.default_channel).declare()
        handoff_queue(django_settings.AGENTS)(broker.default_channel).purge()


def _take_hand_off() -> dict:
    with Connection(django_settings.CELERY_BROKER_URL) as broker:
        message = handoff_queue(django_settings.AGENTS)(broker.default_channel).get(no_ack=True)
    assert message is not None, "the step published its hand-off"
    return json.loads(message.body)


def _gateway_answers(task: AgentTask) -> dict:
    """Claim the hand-off, ask the model, record the reply and return the step, as the
    gateway does; what it hands back."""
    body = _take_hand_off()
    payload, holder = body["payload"], lease_owner_name("test-gateway")
    claim = handoff_claim(task_id=task.pk, step=body["step"], fence=body["fence"], holder=holder)
    assert claim.claimed
    config = model_config(payload["model"])
    reply = chat_complete(
        config=config,
        messages=payload["messages"],
        tools=payload["tools"],
        headers={"X-Agents-Call": payload["key"]},
        transitions=[],
    )
    note = recorded_note(payload)
    returned = handoff_return(
        task_id=task.pk,
        step=body["step"],
        fence=body["fence"],
        holder=holder,
        agent_name="llm",
        handed_back=note,
        also=lambda: model_call_record(
            task_id=task.pk,
            owner_id=task.owner_id,
            step=body["step"],
            key=payload["key"],
            purpose=ModelCall.Purpose.REPLY,
            config=config,
            reply=reply,
        ),
    )
    assert returned
    return note


def test_a_recorded_reply_is_taken_back_with_one_read_and_one_commit(chat, user, settings):
    settings.LLM = {**settings.LLM, "GATEWAY": True}
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "6*7"}}]},
        {"content": "42"},
    ]
    _purge_hand_offs()  # a run before this one may have left some
    task, _ = task_start(owner=user, agent="llm", input={"prompt": "6*7?", "tools": ["calc"]})
    with CaptureQueriesContext(connection) as first:
        assert step_execute(task_id=task.pk, step=1) == StepResult.HANDED_OFF
    first_sql = [q["sql"] for q in first.captured_queries]
    # The claim; pending -> running with its event in one statement (no row lock); the
    # input (unless this process has it); the request's messages; the conversation; a
    # recorded reply; the hand-off (3).
    assert not [s for s in first_sql if "FOR UPDATE" in s], first_sql
    assert len([s for s in first_sql if s.lstrip().startswith("WITH began")]) == 1
    assert len(first_sql) <= 9, first_sql
    assert AuditEvent.objects.get(task=task, seq=2).payload == {"from": "pending", "to": "running"}
    handed = _gateway_answers(task)

    with CaptureQueriesContext(connection) as queries:
        result = step_execute(task_id=task.pk, step=1, handed_back=handed)
    assert result == StepResult.HANDED_OFF, "step 1 took its reply, step 2 handed off"
    sql = [q["sql"] for q in queries.captured_queries]
    reads = [s for s in sql if s.startswith("SELECT") and 'FROM "llm_message"' in s]
    assert len(reads) == 1, "the next request's plan reads the conversation; the reply's not"
    task_writes = [s for s in sql if "UPDATE agents_agenttask" in s.replace('"', "")]
    assert len(task_writes) == 2, "the claim, then one statement: checkpoint 1 and the hand-off"
    assert "lease_owner" in task_writes[1] and "INSERT INTO agents_checkpoint" in task_writes[1]
    lookups = [s for s in sql if s.startswith("SELECT") and 'FROM "llm_modelcall"' in s]
    assert len(lookups) == 1, "the recorded reply; step 2's request has none to look up"
    writes = [s for s in sql if s.startswith("INSERT INTO llm_message")]
    assert len(writes) == 2, "the reply, then the tool's result; not the request's again"
    assert len(sql) == 8, sql  # calc reads no credentials

    task.refresh_from_db()
    assert task.current_step == 2
    assert task.lease_owner.startswith("handoff/"), "the lease passed to the hand-off queue"
    assert Checkpoint.objects.filter(task=task, step=1).exists()
    event = AuditEvent.objects.get(task=task, type="model_call", step=1)
    assert event.payload["reused"] is False
    assert event.payload["messages_sent"] == handed["messages_sent"] == 1
    assert AuditEvent.objects.filter(task=task, type="tool_result", step=1).count() == 1
    body = _take_hand_off()
    assert (body["step"], body["fence"]) == (2, task.fence)
    holder = lease_owner_name("test-gateway")
    assert handoff_claim(task_id=task.pk, step=2, fence=body["fence"], holder=holder).claimed
    assert [m["role"] for m in body["payload"]["messages"]] == ["user", "assistant", "tool"]
    assert chat.count(task=task.pk) == 1, "the reply was asked for once"
    breaks, verified, _ = audit_chain_verify(task_id=task.pk, audit_seq=task.audit_seq)
    assert (breaks, verified) == ([], task.audit_seq)
