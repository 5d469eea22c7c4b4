"""Issue 12, finding 10: separation of duties for approvals, per agent."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import CommandError, call_command
from django.urls import reverse

from agents.definition import register
from agents.models import TaskStatus
from agents.scripted import Scripted
from agents.services import task_start
from tests.api.conftest import token_client
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


@register
class Refunds(Scripted):
    """The scripted agent, with a refund team's approval rules."""

    name = "refunds-for-tests"
    approvers = "refund-approvers"
    owner_may_approve = False


@pytest.fixture
def approver(django_user_model):
    group, _ = Group.objects.get_or_create(name="refund-approvers")
    group.permissions.add(
        *Permission.objects.filter(codename__in=("view_agenttask", "change_agenttask"))
    )
    user = django_user_model.objects.create_user(username="rita", password="pw", is_staff=True)
    user.groups.add(group)
    return user


def waiting(owner):
    task, _ = task_start(
        owner=owner, agent="refunds-for-tests", input={"script": [{"approval": "refund?"}]}
    )
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED
    return task


def approve(client, task):
    return client.post(f"/api/tasks/{task.pk}/approve/", {"approved": True}, format="json")


def test_the_owner_may_not_approve_their_own_refund(user, approver):
    task = waiting(user)
    response = approve(token_client(user), task)
    assert response.status_code == 403
    assert "separation of duties" in response.json()["detail"]
    assert approve(token_client(approver), task).status_code == 200


def test_an_operator_outside_the_group_may_not_approve(user, other_user, approver):
    task = waiting(user)
    other_user.user_permissions.add(Permission.objects.get(codename="change_agenttask"))
    response = approve(token_client(other_user), task)
    assert response.status_code == 403 and "refund-approvers" in response.json()["detail"]
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED


def test_a_group_member_who_owns_the_task_still_may_not(approver):
    task = waiting(approver)
    assert approve(token_client(approver), task).status_code == 403


def test_the_command_needs_a_named_approver_from_the_group(user, approver):
    task = waiting(user)
    with pytest.raises(CommandError, match="refund-approvers"):
        call_command("approve", str(task.pk), stdout=StringIO())
    with pytest.raises(CommandError, match="separation of duties"):
        call_command("approve", str(task.pk), "--as", user.username, stdout=StringIO())
    call_command("approve", str(task.pk), "--as", approver.username, stdout=StringIO())
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING


def test_the_admin_applies_the_same_rule(client, user, django_user_model, approver):
    task = waiting(user)
    operator = django_user_model.objects.create_superuser(username="root", password="pw")
    client.force_login(operator)  # a superuser outside the group
    client.post(reverse("admin:agents_agenttask_operate", args=[task.pk]), {"action": "approve"})
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED
    client.force_login(approver)
    client.post(reverse("admin:agents_agenttask_operate", args=[task.pk]), {"action": "approve"})
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING


def test_agents_without_rules_keep_the_owner_approving(user):
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"approval": "ok?"}]})
    run_until_idle()
    assert approve(token_client(user), task).status_code == 200
