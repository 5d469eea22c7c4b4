"""Issue 12, finding 1: one permission model for the API, the admin and the commands.

Ownership or Django model permissions grant access; ``is_staff`` alone grants nothing.
A task one may read but not operate is a 403; one one may not read is a 404.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import CommandError, call_command
from django.urls import reverse

from agents.models import AgentTask, TaskStatus
from agents.permissions import OPERATOR_GROUP, OPERATOR_PERMISSIONS
from audit.models import DeadLetter
from tests.api.factories import dead_lettered, started, waiting_for_approval
from tools import breakers

pytestmark = pytest.mark.django_db(transaction=True)

ACTIONS = (
    ("approve/", {"approved": True}),
    ("signal/", {"name": "x"}),
    ("cancel/", None),
    ("replay/", {}),
)


def test_staff_without_permissions_see_and_operate_nothing_of_other_tenants(bare_staff_api, user):
    task = waiting_for_approval(user)
    _, letter = dead_lettered(user)
    assert bare_staff_api.get("/api/tasks/").json()["results"] == []
    for path in ("", "audit/", "checkpoints/"):
        assert bare_staff_api.get(f"/api/tasks/{task.pk}/{path}").status_code == 404, path
    for path, data in ACTIONS:
        response = bare_staff_api.post(f"/api/tasks/{task.pk}/{path}", data, format="json")
        assert response.status_code == 404, path
    assert bare_staff_api.get("/api/dead-letters/").json()["results"] == []
    assert bare_staff_api.post(f"/api/dead-letters/{letter.pk}/requeue/").status_code == 404
    assert bare_staff_api.get("/api/breakers/").status_code == 403
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED


def test_a_viewer_reads_every_task_but_operating_one_is_403(viewer_api, user):
    task = waiting_for_approval(user)
    _, letter = dead_lettered(user)
    listed = {t["id"] for t in viewer_api.get("/api/tasks/").json()["results"]}
    assert str(task.pk) in listed
    for path in ("", "audit/", "checkpoints/"):
        assert viewer_api.get(f"/api/tasks/{task.pk}/{path}").status_code == 200, path
    for path, data in ACTIONS:
        response = viewer_api.post(f"/api/tasks/{task.pk}/{path}", data, format="json")
        assert response.status_code == 403, (path, response.json())
        assert response.json()["error"] == "forbidden"
    assert len(viewer_api.get("/api/dead-letters/").json()["results"]) == 1
    assert viewer_api.post(f"/api/dead-letters/{letter.pk}/requeue/").status_code == 403
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED
    assert AgentTask.objects.filter(replayed_from=task).count() == 0
    assert DeadLetter.objects.get(pk=letter.pk).requeued_at is None


def test_an_operator_operates_any_tenants_task(staff_api, user):
    task = waiting_for_approval(user)
    _, letter = dead_lettered(user)
    assert (
        staff_api.post(
            f"/api/tasks/{task.pk}/approve/", {"approved": True}, format="json"
        ).status_code
        == 200
    )
    assert staff_api.post(f"/api/tasks/{task.pk}/replay/", {}, format="json").status_code == 201
    assert staff_api.post(f"/api/dead-letters/{letter.pk}/requeue/").status_code == 200
    assert staff_api.get("/api/breakers/").status_code == 200


def test_permissions_work_without_staff_too(api, user, other_user):
    """The API reads permissions, not is_staff: a non-staff user given the permission
    may read another tenant's task."""
    theirs = started(other_user)
    assert api.get(f"/api/tasks/{theirs.pk}/").status_code == 404
    user.user_permissions.add(Permission.objects.get(codename="view_agenttask"))
    assert api.get(f"/api/tasks/{theirs.pk}/").status_code == 200


def test_the_operator_group_command_creates_the_group_idempotently():
    out = StringIO()
    call_command("operator_group", stdout=out)
    call_command("operator_group", stdout=out)
    group = Group.objects.get(name=OPERATOR_GROUP)
    held = {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.all()}
    assert held == set(OPERATOR_PERMISSIONS)
    assert "tools.view_breaker" in out.getvalue()


# --- the admin ----------------------------------------------------------------------------


def test_admin_staff_without_permissions_cannot_open_tasks_dead_letters_or_breakers(
    client, bare_staff, user
):
    task = started(user)
    client.force_login(bare_staff)
    for url in (
        reverse("admin:agents_agenttask_changelist"),
        reverse("admin:agents_agenttask_change", args=[task.pk]),
        reverse("admin:audit_deadletter_changelist"),
        reverse("admin-breakers"),
    ):
        assert client.get(url).status_code == 403, url
    operate = reverse("admin:agents_agenttask_operate", args=[task.pk])
    assert client.post(operate, {"action": "cancel"}).status_code == 403
    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING


def test_admin_a_viewer_cannot_requeue_dead_letters(client, viewer, user):
    task, letter = dead_lettered(user)
    client.force_login(viewer)
    listing = reverse("admin:audit_deadletter_changelist")
    assert client.get(listing).status_code == 200
    client.post(listing, {"action": "requeue_letters", "_selected_action": [str(letter.pk)]})
    assert DeadLetter.objects.get(pk=letter.pk).requeued_at is None


def test_admin_the_operator_group_is_enough_to_operate(client, staff, user):
    task = waiting_for_approval(user)
    breakers.breaker_names()  # the page lists whatever exists
    client.force_login(staff)
    assert client.get(reverse("admin-breakers")).status_code == 200
    operate = reverse("admin:agents_agenttask_operate", args=[task.pk])
    client.post(operate, {"action": "approve"})
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING


# --- the commands ---------------------------------------------------------------------


def test_commands_as_a_user_follow_the_same_rule(viewer, bare_staff, staff, user):
    task = waiting_for_approval(user)
    with pytest.raises(CommandError, match="not operate"):
        call_command("approve", str(task.pk), "--as", viewer.username, stdout=StringIO())
    with pytest.raises(CommandError, match="no task"):
        call_command("approve", str(task.pk), "--as", bare_staff.username, stdout=StringIO())
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED
    call_command("approve", str(task.pk), "--as", staff.username, stdout=StringIO())
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING
