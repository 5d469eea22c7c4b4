"""approve, signal, cancel and replay through the API: they call the services, and a
refusal by the task's state is a 409."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, Checkpoint, Signal, TaskStatus
from audit.models import AuditEvent
from tests.api.factories import completed, started, waiting_for_approval, waiting_for_event
from tests.helpers import queue_depth, run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def test_approving_resumes_the_task_and_a_second_decision_is_409(api, user):
    task = waiting_for_approval(user)
    response = api.post(
        f"/api/tasks/{task.pk}/approve/", {"approved": True, "comment": "fine"}, format="json"
    )
    assert response.status_code == 200, response.json()
    assert response.json()["status"] == "running"
    decided = AuditEvent.objects.get(task=task, type="approval_decided")
    assert decided.payload["comment"] == "fine" and decided.actor == "user:alice"
    again = api.post(f"/api/tasks/{task.pk}/approve/", {"approved": False}, format="json")
    assert again.status_code == 409
    assert again.json()["error"] == "conflict"
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED


def test_rejecting_fails_the_task(api, user):
    task = waiting_for_approval(user)
    response = api.post(f"/api/tasks/{task.pk}/approve/", {"approved": False}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "failed"


@pytest.mark.parametrize(
    ("data", "field"),
    [({}, "approved"), ({"approved": "yes"}, "approved"), ({"approved": 1}, "approved")],
)
def test_approve_needs_a_boolean(api, user, data, field):
    task = started(user)
    response = api.post(f"/api/tasks/{task.pk}/approve/", data, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_approving_a_task_that_does_not_wait_for_it_is_409(api, user):
    task = started(user)
    response = api.post(f"/api/tasks/{task.pk}/approve/", {"approved": True}, format="json")
    assert response.status_code == 409


def test_a_signal_resumes_the_task_waiting_for_it(api, user):
    task = waiting_for_event(user)
    response = api.post(
        f"/api/tasks/{task.pk}/signal/", {"name": "paid", "payload": {"amount": 5}}, format="json"
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["name"] == "paid" and body["payload"] == {"amount": 5}
    assert body["consumed_at"] is not None
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING


def test_a_signal_before_the_wait_is_kept(api, user):
    task = started(user)
    response = api.post(f"/api/tasks/{task.pk}/signal/", {"name": "later"}, format="json")
    assert response.status_code == 201
    assert response.json()["consumed_at"] is None
    assert Signal.objects.filter(task=task, consumed_at__isnull=True).count() == 1


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "name"),
        ({"name": 3}, "name"),
        ({"name": "n" * 201}, "name"),
        ({"name": "ok", "payload": {"k": "nul\u0000"}}, "payload"),
    ],
)
def test_signal_validation_names_the_field(api, user, data, field):
    task = started(user)
    response = api.post(f"/api/tasks/{task.pk}/signal/", data, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_a_signal_payload_over_the_limit_is_refused(api, user, settings):
    settings.AGENTS = {**settings.AGENTS, "MAX_INPUT_BYTES": 100}
    task = started(user)
    data = {"name": "big", "payload": "x" * 200}
    response = api.post(f"/api/tasks/{task.pk}/signal/", data, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "payload"


def test_a_signal_to_an_ended_task_is_409(api, user):
    task = completed(user)
    response = api.post(f"/api/tasks/{task.pk}/signal/", {"name": "x"}, format="json")
    assert response.status_code == 409


def test_cancel_then_cancel_again_is_409(api, user):
    task = started(user)
    response = api.post(f"/api/tasks/{task.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert api.post(f"/api/tasks/{task.pk}/cancel/").status_code == 409
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.CANCELLED


def test_replay_starts_a_linked_task_from_the_checkpoint_and_leaves_the_original(api, user):
    original = completed(user)
    trail = list(AuditEvent.objects.filter(task=original).values_list("seq", "type"))
    response = api.post(f"/api/tasks/{original.pk}/replay/", {"from_step": 1}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["replayed_from"] == str(original.pk) and body["replayed_from_step"] == 1
    assert body["current_step"] == 2 and body["id"] != str(original.pk)
    replay = AgentTask.objects.get(pk=body["id"])
    first = AuditEvent.objects.filter(task=replay).order_by("seq").first()
    assert first.type == "replayed_from"
    assert first.payload == {"task": str(original.pk), "checkpoint": 1}
    assert Checkpoint.objects.get(task=replay, step=1).state == (
        Checkpoint.objects.get(task=original, step=1).state
    )
    assert queue_depth() == 1
    run_until_idle()
    replay.refresh_from_db()
    assert replay.status == TaskStatus.COMPLETED and replay.result == 42
    original.refresh_from_db()
    assert original.status == TaskStatus.COMPLETED
    assert list(AuditEvent.objects.filter(task=original).values_list("seq", "type")) == trail


def test_replay_without_a_step_starts_from_the_latest_checkpoint(api, user):
    original = completed(user)
    body = api.post(f"/api/tasks/{original.pk}/replay/", format="json").json()
    assert body["replayed_from_step"] == original.current_step - 1


@pytest.mark.parametrize("from_step", [99, -1, "1", 1.5, 2**40])
def test_replay_from_a_checkpoint_that_is_not_there_is_400(api, user, from_step):
    original = completed(user)
    response = api.post(
        f"/api/tasks/{original.pk}/replay/", {"from_step": from_step}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["field"] == "from_step"
    assert AgentTask.objects.count() == 1
