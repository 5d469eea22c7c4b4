"""The admin's task page shows an LLM task's conversation above the audit timeline."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agents.services import task_start
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_task_page_shows_the_conversation_with_tokens_and_cost(
    chat, user, client, django_user_model
):
    chat.script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "6 * 7"}}]},
        {"content": "It is 42."},
    ]
    task, _ = task_start(owner=user, agent="llm", input={"prompt": "6 x 7?", "tools": ["calc"]})
    run_until_idle()
    client.force_login(django_user_model.objects.create_superuser(username="ops", password="pw"))
    html = client.get(reverse("admin:agents_agenttask_change", args=[task.pk])).content.decode()
    assert 'id="conversation"' in html
    assert html.index('id="conversation"') < html.index('id="timeline"')
    assert "4 messages" in html and "2 model calls" in html
    assert "6 x 7?" in html and "It is 42." in html
    assert "calls <code>calc</code>" in html
    assert "answers call_" in html


def test_a_task_without_a_conversation_shows_none(user, client, django_user_model):
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})
    client.force_login(django_user_model.objects.create_superuser(username="ops", password="pw"))
    html = client.get(reverse("admin:agents_agenttask_change", args=[task.pk])).content.decode()
    assert 'id="conversation"' not in html
    assert 'id="timeline"' in html
