"""``usage`` on ``GET /api/tasks/{id}/`` and ``GET /api/tasks/{id}/messages/``."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from agents.services import task_start
from tests.api.conftest import token_client
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_throttle_counters() -> None:
    cache.clear()


def run_task(user, chat):
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "6 * 7"}}]},
        {"content": "42"},
    ]
    task, _ = task_start(
        owner=user, agent="llm", input={"prompt": "six times seven", "tools": ["calc"]}
    )
    run_until_idle()
    return task


def test_a_task_shows_its_usage(chat, user):
    task = run_task(user, chat)
    body = token_client(user).get(f"/api/tasks/{task.pk}/").json()
    assert body["status"] == "completed"
    usage = body["usage"]
    assert usage["model_calls"] == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert usage["cost"] == 0.0
    listed = token_client(user).get("/api/tasks/").json()["results"][0]
    assert "usage" not in listed


def test_usage_is_priced_from_the_model_settings(chat, user, settings):
    settings.LLM = {
        **settings.LLM,
        "MODELS": {"scripted": {"price": {"input": 1000000, "output": 2000000}}},
    }
    task = run_task(user, chat)
    usage = token_client(user).get(f"/api/tasks/{task.pk}/").json()["usage"]
    assert usage["cost"] == pytest.approx(usage["prompt_tokens"] + 2 * usage["completion_tokens"])


def test_the_conversation_is_listed_in_order_a_page_at_a_time(chat, user):
    task = run_task(user, chat)
    client = token_client(user)
    first = client.get(f"/api/tasks/{task.pk}/messages/?limit=2").json()
    assert [m["role"] for m in first["results"]] == ["user", "assistant"]
    assert first["results"][1]["tool_calls"][0]["function"]["name"] == "calc"
    assert first["results"][1]["tokens"]["total_tokens"] > 0
    rest = client.get(first["next"]).json()
    assert [m["role"] for m in rest["results"]] == ["tool", "assistant"]
    assert rest["results"][0]["content"] == "42"
    assert rest["results"][0]["tool_call_id"] == first["results"][1]["tool_calls"][0]["id"]
    assert rest["results"][1]["content"] == "42"
    assert rest["next"] is None


def test_another_user_s_conversation_is_not_found(chat, user, other_user):
    task = run_task(user, chat)
    answer = token_client(other_user).get(f"/api/tasks/{task.pk}/messages/")
    assert answer.status_code == 404


def test_a_bad_page_query_names_the_field(chat, user):
    task = run_task(user, chat)
    answer = token_client(user).get(f"/api/tasks/{task.pk}/messages/?limit=0")
    assert answer.status_code == 400
    assert "limit" in answer.json()["detail"] or answer.json().get("field") == "limit"
