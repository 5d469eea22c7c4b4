"""LLM tasks on real workers, PostgreSQL, RabbitMQ and Redis, against a scripted
chat-completions server on loopback (the only stand-in: the model).

The model server runs in this test process; the workers reach it over HTTP with the
real ``openai`` SDK, and it counts the requests it gets per task and step.
"""

from __future__ import annotations

import pytest

from agents.core.suspensions import task_approve
from agents.models import TaskStatus
from agents.permissions import operator_group_ensure
from agents.services import task_start
from audit.models import AuditEvent
from llm.models import Message, ModelCall
from llm.testing.chat_server import estimate
from tests.helpers import wait_until
from tests.integration import llm_tools  # noqa: F401 (registers the test tools here too)
from tests.integration.llm_helpers import ended, llm_env, start, status_of
from tools.models import LedgerEntry

pytestmark = pytest.mark.integration


@pytest.fixture
def staff_user(django_user_model):
    olga = django_user_model.objects.create_user(username="olga", password="pw", is_staff=True)
    olga.groups.add(operator_group_ensure())  # staff alone may not approve
    return olga


def test_a_worker_killed_while_a_tool_runs_after_the_model_answered_pays_once(
    workers, user, chat, tmp_path
):
    marker = tmp_path / "slow-tool-started"
    chat.script = [
        {
            "tool_calls": [
                {"name": "ledger.append", "arguments": {"key": "before", "value": 1}},
                {"name": "test.slow_once", "arguments": {"marker": str(marker)}},
            ]
        },
        {"content": "all done"},
    ]
    workers.start(concurrency=1, **llm_env(chat))
    task = start(user, tools=["ledger.append", "test.slow_once"])
    wait_until(marker.exists, timeout=60)
    # The model answered step 1 and its tools are running: the worker dies now.
    assert chat.count(task=task.pk, step=1) == 1
    workers.kill(0)
    workers.start(concurrency=1, **llm_env(chat))
    task = wait_until(lambda: ended(task), timeout=120)

    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result == {"answer": "all done"}
    assert chat.count(task=task.pk, step=1) == 1
    assert ModelCall.objects.filter(task=task, step=1).count() == 1
    calls = AuditEvent.objects.filter(task=task, type="model_call", step=1)
    assert [e.payload["reused"] for e in calls] == [True]
    assert AuditEvent.objects.filter(task=task, type="worker_lost", step=1).exists()
    keys = list(
        AuditEvent.objects.filter(task=task, type="tool_call", step=1)
        .order_by("seq")
        .values_list("payload__idempotency_key", flat=True)
    )
    assert keys == [f"{task.pk}:1:0", f"{task.pk}:1:1"]
    assert LedgerEntry.objects.filter(task=task).count() == 1
    assert list(Message.objects.filter(task=task).values_list("seq", flat=True)) == [0, 1, 2, 3, 4]


def test_a_tool_needing_approval_waits_and_a_rejection_reaches_the_model(
    workers, user, staff_user, chat
):
    chat.script = [
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "refund", "value": 90}}]},
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "refund", "value": 40}}]},
        {"content": "refunded 40"},
    ]
    workers.start(concurrency=2, **llm_env(chat))
    task = start(user, tools=["ledger.append"], approve_tools=["ledger.append"])
    wait_until(lambda: status_of(task) == TaskStatus.SUSPENDED, timeout=60)
    question = AuditEvent.objects.filter(task=task, type="suspended").last().payload
    assert "ledger.append" in str(question) and '"value": 90' in str(question)
    assert not LedgerEntry.objects.filter(task=task).exists()
    task_approve(task_id=task.pk, user=staff_user, approved=False, comment="too much")

    wait_until(
        lambda: status_of(task) == TaskStatus.SUSPENDED and chat.count(task=task.pk) == 2,
        timeout=60,
    )
    sent = chat.received(task=task.pk)[1].body["messages"]
    assert sent[-1]["role"] == "tool"
    assert "rejected" in sent[-1]["content"] and "too much" in sent[-1]["content"]
    task_approve(task_id=task.pk, user=staff_user, approved=True)

    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED
    assert list(LedgerEntry.objects.filter(task=task).values_list("value", flat=True)) == [40]


def test_over_budget_the_task_fails_with_budget_exceeded(workers, user, chat):
    chat.script = [{"tool_calls": [{"name": "calc", "arguments": {"expression": "1 + 1"}}]}]
    workers.start(concurrency=2, **llm_env(chat))
    task = start(user, tools=["calc"], budget={"model_calls": 2}, max_steps=10)
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.FAILED
    assert task.error.startswith("budget_exceeded")
    assert chat.count(task=task.pk) == 2


def test_over_budget_with_approval_the_task_asks_to_go_on(workers, user, staff_user, chat):
    chat.scripts["count"] = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "1 + 1"}}]},
        {"content": "two calls later"},
    ]
    workers.start(concurrency=2, **llm_env(chat))
    task = task_start(
        owner=user,
        agent="llm",
        input={
            "prompt": "count",
            "tools": ["calc"],
            "budget": {"model_calls": 1},
            "on_budget": "approval",
        },
    )[0]
    wait_until(lambda: status_of(task) == TaskStatus.SUSPENDED, timeout=60)
    assert chat.count(task=task.pk) == 1
    task_approve(task_id=task.pk, user=staff_user, approved=True)
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED
    assert task.result == {"answer": "two calls later"}


def test_a_budget_approval_always_lets_the_call_it_was_asked_about_go_out(
    workers, user, staff_user, chat
):
    # Calls of about 500 tokens against a budget of 100: each approval must let one
    # call out (it used to grant another 100 tokens and suspend again, forever).
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "1 + 1"}}]},
        {"content": "approved twice"},
    ]
    workers.start(concurrency=2, **llm_env(chat))
    task = start(
        user,
        prompt="count: " + "word " * 400,
        tools=["calc"],
        budget={"tokens": 100},
        on_budget="approval",
    )
    for approval in (1, 2):
        wait_until(lambda: status_of(task) == TaskStatus.SUSPENDED, timeout=60)
        assert chat.count(task=task.pk) == approval - 1
        question = AuditEvent.objects.filter(task=task, type="suspended").last().payload
        assert "more tokens for this task" in str(question)
        task_approve(task_id=task.pk, user=staff_user, approved=True)
        wait_until(lambda a=approval: chat.count(task=task.pk) == a, timeout=60)
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result == {"answer": "approved twice"}
    assert chat.count(task=task.pk) == 2


def test_the_owner_s_daily_token_budget_spans_their_tasks(workers, user, chat):
    # Each task makes one call of about 11 tokens, and estimates the next at 5 before
    # making it: two fit in 25 tokens a day, the third would pass it.
    chat.script = [{"content": "short"}]
    workers.start(concurrency=2, **llm_env(chat, AGENTS_LLM_OWNER_DAILY_TOKENS="25"))
    done = []
    for _ in range(3):
        task = start(user)
        done.append(wait_until(lambda t=task: ended(t), timeout=60))
    assert [t.status for t in done] == ["completed", "completed", "failed"]
    assert done[2].error.startswith("budget_exceeded")
    assert chat.count(task=done[2].pk) == 0
    used = sum(c.total_tokens for c in ModelCall.objects.filter(owner=user))
    assert ModelCall.objects.filter(owner=user).count() == 2
    assert used <= 25 < used + 5


# --- provider trouble ---------------------------------------------------------------------


def test_429_and_503_with_retry_after_wait_without_spending_attempts(workers, user, chat):
    chat.script = [
        {"status": 429, "retry_after": 0.5},
        {"status": 503, "retry_after": 0.5},
        {"status": 429, "retry_after": 0.5},
        {"content": "patience"},
    ]
    workers.start(concurrency=1, **llm_env(chat, AGENTS_MAX_RETRIES="1"))
    task = start(user)
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert chat.count(task=task.pk, step=1) == 4
    waits = AuditEvent.objects.filter(task=task, type="step_failed")
    assert [e.payload["retry_in_seconds"] for e in waits] == [0.5, 0.5, 0.5]
    assert not task.dead_letters.exists()


def test_server_errors_and_malformed_answers_are_retried(workers, user, chat):
    chat.script = [{"status": 500}, {"malformed": True}, {"content": "third time"}]
    workers.start(
        concurrency=1,
        **llm_env(chat, AGENTS_RETRY_BACKOFF="0.05", AGENTS_RETRY_BACKOFF_MAX="0.1"),
    )
    task = start(user)
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED
    assert task.result == {"answer": "third time"}
    assert chat.count(task=task.pk, step=1) == 3


def test_an_unreachable_model_opens_its_breaker_and_tasks_wait_not_fail(
    workers, user, chat, settings
):
    url = chat.url
    chat.stop()
    env = llm_env(
        chat,
        AGENTS_BREAKER_FAIL_MAX="2",
        AGENTS_BREAKER_RESET_TIMEOUT="1",
        AGENTS_RETRY_BACKOFF="0.05",
        AGENTS_RETRY_BACKOFF_MAX="0.1",
        AGENTS_MAX_RETRIES="3",
    )
    from tools.breakers import force_close

    force_close(f"llm:127.0.0.1:{url.split(':')[2].split('/')[0]}", actor="test")
    env["AGENTS_LLM_BASE_URL"] = url
    workers.start(concurrency=2, **env)
    task = start(user)
    wait_until(
        lambda: AuditEvent.objects.filter(
            task=task, type="step_failed", payload__error_type="CircuitOpen"
        ).exists(),
        timeout=60,
    )
    assert status_of(task) == TaskStatus.RUNNING
    opened = AuditEvent.objects.filter(task=task, type="breaker", payload__to="open")
    assert opened.exists()


def test_a_context_too_long_shrinks_a_rolling_request_and_retries_once(workers, user, chat):
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": f"{i} + 1"}}]}
        for i in range(6)
    ] + [{"content": "done"}]
    workers.start(concurrency=1, **llm_env(chat))
    task = start(user, tools=["calc"], context={"policy": "rolling", "max_messages": 50})
    # Let the conversation grow, then make the model refuse long requests.
    wait_until(lambda: chat.count(task=task.pk) >= 5, timeout=60)
    chat.context_limit = max(estimate(r.body) for r in chat.received()) * 3 // 4
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.COMPLETED, task.error
    keys = set(ModelCall.objects.filter(task=task).values_list("key", flat=True))
    assert any(k.endswith(":model:2") for k in keys)


def test_a_context_too_long_with_the_full_policy_fails_the_task(workers, user, chat):
    chat.context_limit = 1
    workers.start(concurrency=1, **llm_env(chat))
    task = start(user)
    task = wait_until(lambda: ended(task), timeout=60)
    assert task.status == TaskStatus.FAILED
    assert "context" in task.error
    assert chat.count(task=task.pk) == 1


# --- context policies ---------------------------------------------------------------------

LONG_RUN = [
    {"tool_calls": [{"name": "calc", "arguments": {"expression": f"{i} * 2"}}]} for i in range(8)
] + [{"content": "finished"}]


def test_rolling_keeps_the_latest_whole_turns(workers, user, chat):
    chat.script = LONG_RUN
    workers.start(concurrency=1, **llm_env(chat))
    task = start(
        user, system="count", tools=["calc"], context={"policy": "rolling", "max_messages": 5}
    )
    task = wait_until(lambda: ended(task), timeout=90)
    assert task.status == TaskStatus.COMPLETED
    for request in chat.received(task=task.pk):
        messages = request.body["messages"]
        assert messages[0]["role"] == "system"
        assert len(messages) <= 5
        assert messages[1]["role"] != "tool"
        ids = {c["id"] for m in messages for c in m.get("tool_calls") or ()}
        assert all(m["tool_call_id"] in ids for m in messages if m["role"] == "tool")
    last = chat.received(task=task.pk)[-1].body["messages"]
    assert last[-1]["content"] == "14"
    assert Message.objects.filter(task=task).count() == 2 + 8 * 2 + 1


def test_summarize_folds_old_turns_once_and_reuses_the_summary(workers, user, chat):
    chat.script = LONG_RUN
    workers.start(concurrency=1, **llm_env(chat))
    task = start(
        user, tools=["calc"], context={"policy": "summarize", "max_messages": 6, "keep_last": 2}
    )
    task = wait_until(lambda: ended(task), timeout=90)
    assert task.status == TaskStatus.COMPLETED
    summaries = ModelCall.objects.filter(task=task, purpose="summary")
    assert summaries.exists()
    assert chat.count(task=task.pk, purpose="summary") == summaries.count()
    replies = chat.received(task=task.pk, purpose="model")
    with_summary = [
        r
        for r in replies
        if any(
            "Summary of the earlier conversation" in (m["content"] or "")
            for m in r.body["messages"]
        )
    ]
    # Once made, a summary goes into every later request, not made again each step.
    assert len(with_summary) > summaries.count()
    for request in replies:
        assert request.body["messages"][0]["content"] == "go"
        assert len(request.body["messages"]) <= 6 + 1
    events = AuditEvent.objects.filter(task=task, type="model_call", payload__purpose="summary")
    assert events.count() == summaries.count()


def test_select_keeps_the_prompt_and_pinned_results(workers, user, chat):
    chat.script = [
        {"tool_calls": [{"name": "ledger.append", "arguments": {"key": "fact", "value": 7}}]},
        *LONG_RUN,
    ]
    workers.start(concurrency=1, **llm_env(chat))
    task = start(
        user,
        system="sys",
        tools=["calc", "ledger.append"],
        context={"policy": "select", "max_messages": 6, "pin_tools": ["ledger.append"]},
    )
    task = wait_until(lambda: ended(task), timeout=90)
    assert task.status == TaskStatus.COMPLETED
    last = chat.received(task=task.pk)[-1].body["messages"]
    assert [m["content"] for m in last[:2]] == ["sys", "go"]
    assert any('"key": "fact"' in (m["content"] or "") for m in last)
    assert len(last) < Message.objects.filter(task=task).count()
