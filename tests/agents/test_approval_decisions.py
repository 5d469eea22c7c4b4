"""Issue 25.5: approve, edit, reject or respond to a tool call's approval (in-process
worker; ``tests/integration/test_approval_decisions.py`` runs them on real workers)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import CommandError, call_command

from agents.core.suspensions import task_approve
from agents.definition import register
from agents.models import AgentTask, Suspension, TaskStatus
from agents.scripted import Scripted
from agents.services import task_start
from agents_project.errors import Forbidden, InvalidInput
from audit.models import AuditEvent
from tests.api.conftest import token_client
from tests.helpers import run_until_idle
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)

REFUND = {"key": "refund", "value": 90}


@register
class GuardedRefunds(Scripted):
    """The scripted agent under a refund team's approval rules."""

    name = "guarded-refunds-for-tests"
    approvers = "refund-approvers"
    owner_may_approve = False


def waiting(owner, *, agent: str = "scripted", **options) -> AgentTask:
    """A task suspended on the approval of ``ledger.append`` with ``REFUND``."""
    script = [{"tool": "ledger.append", "args": REFUND, "approve": "refund 90?", **options}]
    task, _ = task_start(owner=owner, agent=agent, input={"script": script})
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED
    return task


def decided(task: AgentTask) -> dict:
    return AuditEvent.objects.get(task=task, type="approval_decided").payload


def test_an_edit_runs_the_tool_with_the_new_args_and_the_audit_has_both_and_the_diff(user):
    task = waiting(user)
    response = token_client(user).post(
        f"/api/tasks/{task.pk}/approve/",
        {"decision": "edit", "args": {"key": "refund", "value": 40}, "comment": "too much"},
        format="json",
    )
    assert response.status_code == 200, response.json()
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert list(LedgerEntry.objects.filter(task=task).values_list("value", flat=True)) == [40]
    event = decided(task)
    assert event["decision"] == "edit" and event["approved"] is True
    assert event["original_args"] == REFUND
    assert event["args"] == {"key": "refund", "value": 40}
    assert event["diff"] == [{"op": "replace", "path": "/value", "value": 40}]
    assert event["decided_by"] == user.username and event["comment"] == "too much"
    assert AuditEvent.objects.get(task=task, type="approval_decided").actor == f"user:{user}"
    assert Suspension.objects.get(task=task).resolution == "edited"


def test_a_respond_does_not_run_the_tool_and_its_message_is_the_result(user):
    task = waiting(user)
    task_approve(task_id=task.pk, user=user, decision="respond", message="refund by hand")
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == "refund by hand"
    assert not LedgerEntry.objects.filter(task=task).exists()
    assert not AuditEvent.objects.filter(task=task, type="tool_call").exists()
    assert decided(task)["message"] == "refund by hand"


def test_reject_and_the_older_approved_form_keep_working(user):
    rejected, approved = waiting(user), waiting(user)
    client = token_client(user)
    assert (
        client.post(
            f"/api/tasks/{rejected.pk}/approve/", {"decision": "reject"}, format="json"
        ).status_code
        == 200
    )
    assert (
        client.post(
            f"/api/tasks/{approved.pk}/approve/", {"approved": True}, format="json"
        ).status_code
        == 200
    )
    run_until_idle()
    rejected.refresh_from_db()
    approved.refresh_from_db()
    assert rejected.status == TaskStatus.FAILED
    assert approved.status == TaskStatus.COMPLETED
    assert list(LedgerEntry.objects.filter(task=approved).values_list("value", flat=True)) == [90]
    assert not LedgerEntry.objects.filter(task=rejected).exists()
    assert decided(approved)["decision"] == "approve"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"decision": "edit", "args": {"key": "refund", "value": 40, "note": 1}}, "args.note"),
        ({"decision": "edit", "args": {"value": 40}}, "args.key"),
        ({"decision": "edit", "args": {"key": 5, "value": 40}}, "args.key"),
        ({"decision": "edit", "args": [1]}, "args"),
        ({"decision": "edit"}, "args"),
        ({"decision": "respond"}, "message"),
        ({"decision": "respond", "message": ""}, "message"),
        ({"decision": "approve", "args": {"key": "x"}}, "args"),
        ({"decision": "approve", "approved": False}, "decision"),
        ({"decision": "maybe"}, "decision"),
        ({}, "approved"),  # the field of the older form, as before
    ],
)
def test_a_bad_decision_names_the_field_and_changes_nothing(user, body, field):
    task = waiting(user)
    response = token_client(user).post(f"/api/tasks/{task.pk}/approve/", body, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["field"] == field, response.json()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED
    assert not AuditEvent.objects.filter(task=task, type="approval_decided").exists()
    assert Suspension.objects.get(task=task).resolved_at is None


def test_edit_and_respond_need_the_approval_of_a_tool_call(user):
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"approval": "ok?"}]})
    run_until_idle()
    for decision in ({"decision": "edit", "args": {}}, {"decision": "respond", "message": "x"}):
        with pytest.raises(InvalidInput) as refused:
            task_approve(task_id=task.pk, user=user, **decision)
        assert refused.value.field == "decision"


def test_the_approval_rules_hold_for_every_decision(user, django_user_model):
    group, _ = Group.objects.get_or_create(name="refund-approvers")
    group.permissions.add(
        *Permission.objects.filter(codename__in=("view_agenttask", "change_agenttask"))
    )
    rita = django_user_model.objects.create_user(username="rita", password="pw")
    rita.groups.add(group)
    task = waiting(user, agent="guarded-refunds-for-tests")
    for decision in (
        {"decision": "edit", "args": {"key": "refund", "value": 1}},
        {"decision": "respond", "message": "no"},
    ):
        with pytest.raises(Forbidden):
            task_approve(task_id=task.pk, user=user, **decision)  # the owner, not an approver
    task_approve(task_id=task.pk, user=rita, decision="edit", args={"key": "refund", "value": 1})
    run_until_idle()
    assert list(LedgerEntry.objects.filter(task=task).values_list("value", flat=True)) == [1]


def test_the_approve_command_edits_and_responds(user):
    edited, answered = waiting(user), waiting(user)
    out = StringIO()
    call_command("approve", str(edited.pk), "--edit", '{"key": "refund", "value": 7}', stdout=out)
    call_command("approve", str(answered.pk), "--respond", "done by hand", stdout=out)
    with pytest.raises(CommandError, match="args.key"):
        call_command("approve", str(waiting(user).pk), "--edit", '{"key": null, "value": 1}')
    run_until_idle()
    assert list(LedgerEntry.objects.filter(task=edited).values_list("value", flat=True)) == [7]
    answered.refresh_from_db()
    assert answered.result == "done by hand"
    assert decided(edited)["decided_by"] == "cli"


def test_the_admin_edits_a_tool_calls_arguments(user, django_user_model, client):
    olga = django_user_model.objects.create_user(username="olga", password="pw", is_staff=True)
    olga.user_permissions.add(
        *Permission.objects.filter(codename__in=("view_agenttask", "change_agenttask"))
    )
    client.force_login(olga)
    task = waiting(user)
    page = client.get(f"/admin/agents/agenttask/{task.pk}/change/")
    assert b"decide-args" in page.content
    response = client.post(
        f"/admin/agents/agenttask/{task.pk}/operate/",
        {"action": "edit", "args": '{"key": "refund", "value": 3}', "comment": ""},
    )
    assert response.status_code == 302
    run_until_idle()
    assert list(LedgerEntry.objects.filter(task=task).values_list("value", flat=True)) == [3]
    assert decided(task)["decided_by"] == "olga"
