"""The model gateway (``llm.gateway``) on real processes: workers that hand model calls
off, a gateway (``manage.py llm_gateway``) that makes them, PostgreSQL, RabbitMQ and
Redis, and the scripted chat-completions server on loopback through the real SDK.

Every check counts requests, records and side effects; none measures time.
"""

from __future__ import annotations

import os
import signal

import pytest

from agents.core.suspensions import task_cancel
from agents.models import AgentTask, TaskStatus
from audit.models import AuditEvent
from llm.models import ModelCall
from tests.helpers import wait_until
from tests.integration.llm_helpers import ended, llm_env, start
from tools.models import LedgerEntry

pytestmark = pytest.mark.integration

CALC = {"name": "calc", "arguments": {"op": "add", "a": 2, "b": 3}}


def gateway_env(chat, **extra: str) -> dict[str, str]:
    return llm_env(chat, AGENTS_LLM_GATEWAY="true", **extra)


def test_sessions_wait_on_the_model_in_the_gateway_not_in_pool_processes(workers, user, chat):
    # One pool process, six sessions whose model answers only once it holds six
    # requests at once: it gets there, because no pool process waits for an answer.
    chat.script = [{"tool_calls": [CALC], "until_in_flight": 6}, {"content": "five"}]
    env = gateway_env(chat, AGENTS_LLM_TIMEOUT="60")  # the first request waits for the sixth
    workers.start(concurrency=1, **env)
    workers.start_gateway(**env)
    tasks = [start(user, tools=["calc"]) for _ in range(6)]
    for task in tasks:
        done = wait_until(lambda t=task: ended(t), timeout=120)
        assert done.status == TaskStatus.COMPLETED, done.error
        assert done.result == {"answer": "five"}
        assert chat.count(task=task.pk) == 2
        assert ModelCall.objects.filter(task=task).count() == 2
        reused = AuditEvent.objects.filter(task=task, type="model_call").values_list(
            "payload__reused", flat=True
        )
        assert list(reused) == [False, False]
    assert chat.in_flight_max == 6
    # Each model call was a hand-off: the task's lease is free and nothing is in flight.
    assert not AgentTask.objects.exclude(lease_owner="").filter(pk__in=[t.pk for t in tasks])


def test_a_reply_calling_only_local_tools_is_taken_in_the_gateway_others_in_a_worker(
    workers, user, chat
):
    # calc is a local tool: the gateway runs the step that takes the reply, its tool and
    # the next request's hand-off; ledger.append writes, so its step goes to a worker.
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "2 + 3"}}]},
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "k", "value": 5}}]},
        {"content": "five"},
    ]
    workers.start(concurrency=1, **gateway_env(chat))
    gateway = workers.start_gateway(**gateway_env(chat))
    task = start(user, tools=["calc", "ledger.append"])
    done = wait_until(lambda: ended(task), timeout=120)
    assert done.status == TaskStatus.COMPLETED, done.error
    assert done.result == {"answer": "five"}
    assert chat.count(task=task.pk) == 3
    runs = dict(
        AuditEvent.objects.filter(task=task, type="tool_result").values_list(
            "payload__tool", "actor"
        )
    )
    assert runs["calc"].endswith(f":{gateway.pid}")
    assert not runs["ledger.append"].endswith(f":{gateway.pid}")
    assert LedgerEntry.objects.filter(task=task).count() == 1
    # The final answer was taken in the gateway too: it ended the task.
    ended_by = AuditEvent.objects.filter(task=task, type="transition").last()
    assert ended_by is not None and ended_by.actor.endswith(f":{gateway.pid}")
    assert not AgentTask.objects.filter(pk=task.pk).exclude(lease_owner="")


def test_a_gateway_killed_with_calls_in_flight_asks_again_once_and_pays_once(workers, user, chat):
    chat.script = [
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "k", "value": 1}}]},
        {"content": "done", "delay": 30},
        {"content": "done"},
    ]
    workers.start(concurrency=1, **gateway_env(chat))
    workers.start_gateway(**gateway_env(chat))
    tasks = [start(user, tools=["ledger.append"]) for _ in range(3)]
    # Every task's second call is in flight (its answer 30 s away): kill -9 the gateway.
    wait_until(lambda: all(chat.count(task=t.pk, step=2) == 1 for t in tasks), timeout=60)
    workers.kill(1)
    workers.start_gateway(**gateway_env(chat))
    for task in tasks:
        done = wait_until(lambda t=task: ended(t), timeout=120)
        assert done.status == TaskStatus.COMPLETED, done.error
        # The call whose answer never arrived was asked again once; the first one,
        # recorded before the kill, was not asked again.
        assert chat.count(task=task.pk, step=1) == 1
        assert chat.count(task=task.pk, step=2) == 2
        assert ModelCall.objects.filter(task=task).count() == 2
        assert LedgerEntry.objects.filter(task=task).count() == 1


@pytest.mark.parametrize(
    ("point", "continues"),
    [
        # Sent back through the work queue: dead before its message was acknowledged.
        ("handoff_returned@1", "0"),
        # Taken in the gateway: dead once the reply was recorded, before its step ran;
        # then dead in that step's commit (the step ran, nothing of it committed).
        ("handoff_recorded@1", "2"),
        ("before_commit", "2"),
    ],
)
def test_a_reply_recorded_before_the_gateway_died_is_not_asked_again(
    workers, user, chat, tmp_path, point, continues
):
    chat.script = [{"tool_calls": [CALC]}, {"content": "five"}]
    once = tmp_path / "fault-once"
    workers.start(concurrency=1, **gateway_env(chat, AGENTS_LLM_GATEWAY_CONTINUE=continues))
    workers.start_gateway(
        **gateway_env(
            chat,
            AGENTS_FAULT_INJECTION=point,
            AGENTS_FAULT_ONCE_FILE=str(once),
            AGENTS_LLM_GATEWAY_CONTINUE=continues,
        )
    )
    task = start(user, tools=["calc"])
    wait_until(once.exists, timeout=60)
    workers.start_gateway(**gateway_env(chat, AGENTS_LLM_GATEWAY_CONTINUE=continues))
    done = wait_until(lambda: ended(task), timeout=120)
    assert done.status == TaskStatus.COMPLETED, done.error
    assert done.result == {"answer": "five"}
    assert chat.count(task=task.pk, step=1) == 1
    assert ModelCall.objects.filter(task=task, step=1).count() == 1
    assert chat.count(task=task.pk) == 2


def test_cancelling_a_task_closes_its_request_in_the_gateway(workers, user, chat):
    chat.script = [{"hang": True}]
    workers.start(concurrency=1, **gateway_env(chat))
    workers.start_gateway(**gateway_env(chat))
    task = start(user)
    wait_until(lambda: chat.count(task=task.pk) == 1, timeout=60)
    task_cancel(task_id=task.pk, user=None, actor="test")
    wait_until(lambda: chat.disconnected, timeout=30)
    assert chat.disconnected == [f"{task.pk}:1:model"]
    wait_until(
        lambda: not AgentTask.objects.filter(pk=task.pk).exclude(lease_owner="").exists(),
        timeout=30,
    )
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.CANCELLED
    assert chat.count(task=task.pk) == 1


def test_a_hung_request_ends_at_the_step_time_limit_and_spends_an_attempt(workers, user, chat):
    chat.script = [{"hang": True}, {"content": "late but fine"}]
    workers.start(concurrency=1, **gateway_env(chat, AGENTS_STEP_TIME_LIMIT="5"))
    workers.start_gateway(**gateway_env(chat, AGENTS_STEP_TIME_LIMIT="5"))
    task = start(user)
    done = wait_until(lambda: ended(task), timeout=120)
    assert done.status == TaskStatus.COMPLETED, done.error
    assert chat.disconnected == [f"{task.pk}:1:model"]
    assert chat.count(task=task.pk, step=1) == 2
    failures = AuditEvent.objects.filter(task=task, type="step_failed", step=1)
    assert failures.count() == 1, [f.payload for f in failures]
    assert "no answer within" in failures.get().payload["error"]


def test_retry_after_is_waited_out_in_the_gateway_without_spending_an_attempt(workers, user, chat):
    chat.script = [{"status": 429, "retry_after": 1}, {"status": 503, "retry_after": 1},
                   {"content": "ok"}]  # fmt: skip
    workers.start(concurrency=1, **gateway_env(chat))
    workers.start_gateway(**gateway_env(chat))
    task = start(user)
    done = wait_until(lambda: ended(task), timeout=120)
    assert done.status == TaskStatus.COMPLETED, done.error
    assert chat.count(task=task.pk, step=1) == 3
    assert done.attempt == 0
    assert not AuditEvent.objects.filter(task=task, type__in=["step_failed", "retry"]).exists()


def test_max_in_flight_bounds_the_requests_of_every_gateway_together(workers, user, chat):
    chat.script = [{"content": "done", "delay": 1}]
    models = '{"scripted": {"max_in_flight": 2}}'
    workers.start(concurrency=1, **gateway_env(chat, AGENTS_LLM_MODELS=models))
    workers.start_gateway(**gateway_env(chat, AGENTS_LLM_MODELS=models))
    workers.start_gateway(**gateway_env(chat, AGENTS_LLM_MODELS=models))
    tasks = [start(user) for _ in range(8)]
    for task in tasks:
        done = wait_until(lambda t=task: ended(t), timeout=120)
        assert done.status == TaskStatus.COMPLETED, done.error
    assert chat.in_flight_max == 2
    assert len(chat.requests) == 8


def test_sigterm_lets_calls_finish_within_the_drain_then_hands_back_the_rest(workers, user, chat):
    chat.script = [{"hang": True}]
    chat.scripts = {"quick": [{"content": "quick done", "delay": 1}]}
    env = gateway_env(chat, AGENTS_LLM_GATEWAY_DRAIN="3")
    workers.start(concurrency=1, **env)
    gateway = workers.start_gateway(**env)
    quick = start(user, prompt="quick")
    stuck = start(user, prompt="stuck")
    wait_until(lambda: chat.count(task=quick.pk) == 1 and chat.count(task=stuck.pk) == 1,
               timeout=60)  # fmt: skip
    os.kill(gateway.pid, signal.SIGTERM)
    assert gateway.wait(timeout=60) == 0
    assert wait_until(lambda: ended(quick), timeout=60).status == TaskStatus.COMPLETED
    # The call still hanging was given back to the queue, not lost: another gateway
    # takes it (and asks again: its answer never arrived).
    assert chat.disconnected == [f"{stuck.pk}:1:model"]
    chat.script = [{"content": "second try"}]
    workers.start_gateway(**env)
    done = wait_until(lambda: ended(stuck), timeout=60)
    assert done.status == TaskStatus.COMPLETED, done.error
    assert chat.count(task=stuck.pk, step=1) == 2
    assert chat.count(task=quick.pk, step=1) == 1
