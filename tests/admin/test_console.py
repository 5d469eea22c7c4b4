"""The console's task list (columns, search, filters) and its breakers page (acting)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from agents.models import AgentTask
from tests.api.factories import completed, dead_lettered, waiting_for_approval
from tests.console import BREAKER_NAME, held_open, retrying, waiting_on_breaker
from tools import breakers

pytestmark = pytest.mark.django_db(transaction=True)

LIST = "/admin/agents/agenttask/"


def _rows(client, **params) -> str:
    response = client.get(LIST, params)
    assert response.status_code == 200
    return response.content.decode()


def test_the_list_says_what_each_task_waits_on_and_its_last_error(ops_client, user):
    dead, _ = dead_lettered(user)
    waiting = waiting_for_approval(user)
    again = retrying(user)
    with held_open():
        blocked = waiting_on_breaker(user)
        html = _rows(ops_client)
    for column in ("attempt", "waiting on", "next retry", "last error"):
        assert f">{column.capitalize()}<" in html or f">{column}<" in html.lower()
    assert "an operator (requeue)" in html
    assert "approval: Refund 42?" in html
    assert "open circuit breaker" in html
    assert "RetryableError: upstream is down" in html
    assert "flaky upstream" in html
    assert "retry at " in html
    assert all(str(t.pk) in html for t in (dead, waiting, again, blocked))


def test_search_by_agent_owner_error_text_and_date_range(ops_client, user, other_user):
    dead, _ = dead_lettered(user)
    theirs = completed(other_user)
    again = retrying(other_user)

    def found(q: str) -> set[str]:
        html = _rows(ops_client, q=q)
        return {str(t.pk) for t in (dead, theirs, again) if str(t.pk) in html}

    assert found("owner:bob") == {str(theirs.pk), str(again.pk)}
    assert found("alice") == {str(dead.pk)}
    assert found("agent:scripted owner:alice") == {str(dead.pk)}
    assert found("agent:nothing") == set()
    assert found('error:"upstream is down"') == {str(dead.pk)}
    assert found("flaky") == {str(again.pk)}
    assert found(str(theirs.pk)) == {str(theirs.pk)}
    AgentTask.objects.filter(pk=dead.pk).update(created_at=timezone.now() - timedelta(days=40))
    month_ago = (timezone.now() - timedelta(days=30)).date().isoformat()
    assert found(f"after:{month_ago}") == {str(theirs.pk), str(again.pk)}
    assert found(f"before:{month_ago}") == {str(dead.pk)}
    html = _rows(ops_client, q="after:yesterday")
    assert "after: wants a date" in html and str(theirs.pk) not in html


def test_filters_by_owner_and_age(ops_client, user, other_user):
    mine = completed(user)
    theirs = completed(other_user)
    AgentTask.objects.filter(pk=theirs.pk).update(created_at=timezone.now() - timedelta(days=9))
    html = _rows(ops_client, owner=str(user.pk))
    assert str(mine.pk) in html and str(theirs.pk) not in html
    assert ">alice<" in html and ">bob<" in html  # both owners offered in the filter
    html = _rows(ops_client, age="1h")
    assert str(mine.pk) in html and str(theirs.pk) not in html
    html = _rows(ops_client, age="old")
    assert str(theirs.pk) in html and str(mine.pk) not in html


def test_an_operator_holds_a_breaker_open_closes_it_and_pre_opens_one_by_name(ops_client):
    page = reverse("admin-breakers")
    name = "http:maintenance.internal:443"
    try:
        with held_open():
            breakers.force_close(BREAKER_NAME, actor="test")
            response = ops_client.post(page, {"action": "open", "name": BREAKER_NAME})
            assert response.status_code == 302
            assert breakers.breaker_status(BREAKER_NAME).forced is True
            html = ops_client.get(page).content.decode()
            assert f"Circuit breaker {BREAKER_NAME} is held open." in html
            ops_client.post(page, {"action": "close", "name": BREAKER_NAME})
            status = breakers.breaker_status(BREAKER_NAME)
            assert status.state == "closed" and status.forced is False
        assert name not in breakers.breaker_names()
        ops_client.post(page, {"action": "open", "name": name})
        assert breakers.breaker_status(name).forced is True
        html = ops_client.get(page).content.decode()
        assert f'data-name="{name}"' in html and "held open by an operator" in html
        ops_client.post(page, {"action": "open", "name": "two words"})
        assert "must be a breaker name" in ops_client.get(page).content.decode()
    finally:
        with held_open(name):
            pass


def test_breakers_can_be_read_but_not_changed_without_the_permission(reader, reader_client):
    reader.user_permissions.add(Permission.objects.get(codename="view_breaker"))
    page = reverse("admin-breakers")
    html = reader_client.get(page).content.decode()
    assert 'id="preopen"' not in html and "needs the permission" in html
    response = reader_client.post(page, {"action": "open", "name": "weather-api"})
    assert response.status_code == 403
    assert "weather-api" not in breakers.breaker_names()
