"""Audit events are read-only for everyone; dead letters can be listed and requeued; the
breaker page lists every breaker."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from agents.models import TaskStatus
from audit.models import AuditEvent
from tests.api.factories import completed, dead_lettered
from tools import breakers

pytestmark = pytest.mark.django_db(transaction=True)


def test_audit_events_cannot_be_added_changed_or_deleted_even_by_a_superuser(ops_client, user):
    task = completed(user)
    event = AuditEvent.objects.filter(task=task).order_by("seq").first()
    before = (event.type, event.payload, event.actor)
    assert ops_client.get(reverse("admin:audit_auditevent_add")).status_code == 403
    change = reverse("admin:audit_auditevent_change", args=[event.pk])
    view = ops_client.get(change)
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
    assert ops_client.post(change, {"type": "step", "actor": "me"}).status_code == 403
    delete = reverse("admin:audit_auditevent_delete", args=[event.pk])
    assert ops_client.post(delete, {"post": "yes"}).status_code == 403
    listing = reverse("admin:audit_auditevent_changelist")
    bulk = ops_client.post(listing, {"action": "delete_selected", "_selected_action": [event.pk]})
    assert bulk.status_code in (200, 302)
    event.refresh_from_db()
    assert (event.type, event.payload, event.actor) == before
    assert AuditEvent.objects.filter(task=task).count() == task.audit_seq


def test_the_audit_list_searches_by_task_id(ops_client, user):
    task = completed(user)
    listing = reverse("admin:audit_auditevent_changelist")
    html = ops_client.get(listing, {"q": str(task.pk)}).content.decode()
    assert "scripted 1.0 accepted" in html
    assert ops_client.get(listing, {"q": "garbage"}).status_code == 200


def test_dead_letters_are_listed_and_requeued(ops_client, user):
    task, letter = dead_lettered(user)
    listing = reverse("admin:audit_deadletter_changelist")
    html = ops_client.get(listing, {"open": "yes"}).content.decode()
    assert "upstream is down" in html and "retries_exhausted" in html.lower().replace(" ", "_")
    ops_client.post(listing, {"action": "requeue_letters", "_selected_action": [letter.pk]})
    letter.refresh_from_db()
    task.refresh_from_db()
    assert letter.requeued_by == "user:ops" and task.status == TaskStatus.RUNNING
    assert str(task.pk) not in ops_client.get(listing, {"open": "yes"}).content.decode()


def test_the_breaker_page_lists_every_breaker_and_its_state(ops_client):
    breakers.force_open("ledger-db", actor="user:ops")
    try:
        html = ops_client.get(reverse("admin-breakers")).content.decode()
    finally:
        breakers.force_close("ledger-db", actor="user:ops")
    assert "ledger-db" in html and "held open by an operator" in html


def test_the_breaker_page_is_for_staff_only(client, user):
    client.force_login(user)
    response = client.get(reverse("admin-breakers"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_breaker_page_needs_the_view_breaker_permission(client, reader):
    client.force_login(reader)  # staff, may read tasks: not enough
    assert client.get(reverse("admin-breakers")).status_code == 403
    reader.user_permissions.add(Permission.objects.get(codename="view_breaker"))
    assert client.get(reverse("admin-breakers")).status_code == 200
