"""The task pages of the console: list, timeline and checkpoints, and the operator's
actions, which go through the services."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agents.models import AgentTask, TaskStatus
from audit.models import AuditEvent, DeadLetter
from tests.api.factories import completed, dead_lettered, started, waiting_for_approval
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = reverse("admin:agents_agenttask_changelist")


def page(task: AgentTask) -> str:
    return reverse("admin:agents_agenttask_change", args=[task.pk])


def operate(task: AgentTask) -> str:
    return reverse("admin:agents_agenttask_operate", args=[task.pk])


def test_the_list_shows_status_agent_owner_step_age_and_time_in_status(ops_client, user):
    task = waiting_for_approval(user)
    html = ops_client.get(CHANGELIST).content.decode()
    for heading in ("Agent name", "Status", "Owner", "Current step", "Age", "Time in status"):
        assert heading in html
    assert str(task.pk) in html and "suspended" in html and "alice" in html


def test_the_list_filters_by_status_and_searches_by_id(ops_client, user):
    done = completed(user)
    pending = started(user)
    html = ops_client.get(CHANGELIST, {"status__exact": "completed"}).content.decode()
    assert str(done.pk) in html and str(pending.pk) not in html
    html = ops_client.get(CHANGELIST, {"q": str(pending.pk)}).content.decode()
    assert str(pending.pk) in html and str(done.pk) not in html
    assert ops_client.get(CHANGELIST, {"q": "not an id"}).status_code == 200


def test_the_task_page_shows_the_timeline_and_checkpoints_read_only(ops_client, user):
    task = waiting_for_approval(user)
    response = ops_client.get(page(task))
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="timeline"' in html and "waits for approval: Refund 42?" in html
    assert "look at the refund" in html
    assert 'id="checkpoints"' in html and "Replay from step 2" in html
    assert 'name="_save"' not in html, "the task itself is not editable"
    assert 'value="approve"' in html and 'value="cancel"' in html


def test_the_timeline_pages_through_long_trails(ops_client, user):
    task = completed(user)
    total = AuditEvent.objects.filter(task=task).count()
    html = ops_client.get(page(task), {"events_after": total - 2}).content.decode()
    assert f"events {total - 1} to {total} of {total}" in html


def test_approve_from_the_task_page_resumes_the_task(ops_client, user):
    task = waiting_for_approval(user)
    response = ops_client.post(operate(task), {"action": "approve", "comment": "ok by me"})
    assert response.status_code == 302 and response["Location"] == page(task)
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING
    decided = AuditEvent.objects.get(task=task, type="approval_decided")
    assert decided.actor == "user:ops" and decided.payload["comment"] == "ok by me"
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED


def test_reject_and_cancel_from_the_task_page(ops_client, user):
    rejected = waiting_for_approval(user)
    ops_client.post(operate(rejected), {"action": "reject"})
    rejected.refresh_from_db()
    assert rejected.status == TaskStatus.FAILED
    cancelled = started(user)
    ops_client.post(operate(cancelled), {"action": "cancel"})
    cancelled.refresh_from_db()
    assert cancelled.status == TaskStatus.CANCELLED


def test_a_refused_action_is_a_message_not_an_error_page(ops_client, user):
    task = completed(user)
    response = ops_client.post(operate(task), {"action": "cancel"}, follow=True)
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("cannot be cancelled" in m for m in messages)


def test_replay_from_a_checkpoint_opens_the_new_task(ops_client, user):
    original = completed(user)
    response = ops_client.post(operate(original), {"action": "replay", "from_step": 1})
    replay = AgentTask.objects.exclude(pk=original.pk).get()
    assert response["Location"] == page(replay)
    assert (replay.replayed_from_id, replay.replayed_from_step) == (original.pk, 1)
    original.refresh_from_db()
    assert original.status == TaskStatus.COMPLETED


def test_requeue_a_dead_letter_from_the_task_page(ops_client, user):
    task, letter = dead_lettered(user)
    assert 'value="requeue"' in ops_client.get(page(task)).content.decode()
    ops_client.post(operate(task), {"action": "requeue"})
    task.refresh_from_db()
    letter.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and letter.requeued_by == "user:ops"


def test_list_actions_act_on_every_selected_task_and_report_refusals(ops_client, user):
    done = completed(user)
    pending = [started(user) for _ in range(2)]
    response = ops_client.post(
        CHANGELIST,
        {"action": "cancel_tasks", "_selected_action": [str(t.pk) for t in [*pending, done]]},
        follow=True,
    )
    statuses = set(
        AgentTask.objects.filter(pk__in=[t.pk for t in pending]).values_list("status", flat=True)
    )
    assert statuses == {TaskStatus.CANCELLED}
    messages = [str(m) for m in response.context["messages"]]
    assert "2 task(s) cancelled." in messages
    assert any(str(done.pk) in m for m in messages)


def test_approve_reject_replay_and_requeue_list_actions(ops_client, user):
    approve, reject = waiting_for_approval(user), waiting_for_approval(user)
    dead, letter = dead_lettered(user)
    for action, task in (
        ("approve_tasks", approve),
        ("reject_tasks", reject),
        ("requeue_tasks", dead),
        ("replay_tasks", approve),
    ):
        ops_client.post(CHANGELIST, {"action": action, "_selected_action": [str(task.pk)]})
    approve.refresh_from_db()
    reject.refresh_from_db()
    dead.refresh_from_db()
    assert approve.status == TaskStatus.RUNNING and reject.status == TaskStatus.FAILED
    assert dead.status == TaskStatus.RUNNING
    assert AgentTask.objects.filter(replayed_from=approve).count() == 1
    assert DeadLetter.objects.get(pk=letter.pk).requeued_at is not None


def test_a_reader_sees_tasks_but_cannot_act(reader_client, user):
    task = waiting_for_approval(user)
    html = reader_client.get(page(task)).content.decode()
    assert "waits for approval" in html and 'value="approve"' not in html
    assert reader_client.post(operate(task), {"action": "approve"}).status_code == 403
    listing = reader_client.get(CHANGELIST).content.decode()
    assert "cancel_tasks" not in listing
    task.refresh_from_db()
    assert task.status == TaskStatus.SUSPENDED


def test_nobody_adds_or_deletes_tasks_in_the_admin(ops_client, user):
    task = started(user)
    assert ops_client.get(reverse("admin:agents_agenttask_add")).status_code == 403
    delete = reverse("admin:agents_agenttask_delete", args=[task.pk])
    assert ops_client.post(delete, {"post": "yes"}).status_code == 403
    assert AgentTask.objects.filter(pk=task.pk).exists()
