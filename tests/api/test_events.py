"""GET /api/tasks/{id}/events/ through Django's WSGI path (the test client), and the
diagnosis and error fields of the task detail. The ASGI path, with a real worker and
a client that disconnects, is tests/integration/test_event_stream.py."""

from __future__ import annotations

import json

import pytest

from audit.models import AuditEvent
from tests.api.factories import completed, dead_lettered, waiting_for_approval

pytestmark = pytest.mark.django_db(transaction=True)


def _messages(response) -> list[dict[str, str]]:
    body = b"".join(response.streaming_content).decode()
    messages = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            messages.append(fields)
    return messages


def test_an_ended_task_streams_its_whole_trail_then_end(api, user):
    task = completed(user)
    response = api.get(f"/api/tasks/{task.pk}/events/", HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache"
    messages = _messages(response)
    *events, end = messages
    trail = list(AuditEvent.objects.filter(task=task).order_by("seq"))
    assert [int(m["id"]) for m in events] == [e.seq for e in trail]
    assert [m["event"] for m in events] == [e.type for e in trail]
    assert json.loads(events[0]["data"])["payload"] == trail[0].payload
    assert end["event"] == "end" and "id" not in end
    assert json.loads(end["data"]) == {"status": "completed", "last_event_id": trail[-1].seq}


def test_resuming_sends_only_the_later_events_and_204_at_the_end(api, user):
    task = completed(user)
    url = f"/api/tasks/{task.pk}/events/"
    total = AuditEvent.objects.filter(task=task).count()
    from_header = _messages(api.get(url, HTTP_LAST_EVENT_ID=str(total - 2)))
    assert [m.get("id") for m in from_header] == [str(total - 1), str(total), None]
    # The header wins over the query parameter (an EventSource reconnecting sends both).
    both = _messages(api.get(f"{url}?last_event_id=1", HTTP_LAST_EVENT_ID=str(total - 1)))
    assert [m.get("id") for m in both] == [str(total), None]
    assert api.get(url, HTTP_LAST_EVENT_ID=str(total)).status_code == 204
    assert api.get(f"{url}?last_event_id={total}").status_code == 204


def test_another_users_task_is_not_found(other_api, user):
    task = completed(user)
    response = other_api.get(f"/api/tasks/{task.pk}/events/", HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 404
    assert response.content.startswith(b"event: error\ndata: ")


def test_the_task_detail_explains_itself_and_a_dead_letter_has_an_error(api, user):
    task, letter = dead_lettered(user)
    body = api.get(f"/api/tasks/{task.pk}/").json()
    assert body["error"] == letter.error == "RetryableError: upstream is down"
    assert body["diagnosis"]["waiting_on"]["kind"] == "operator"
    assert body["diagnosis"]["last_error"]["message"] == letter.error
    listed = api.get("/api/tasks/").json()["results"]
    assert [t["error"] for t in listed if t["id"] == str(task.pk)] == [letter.error]
    waiting = waiting_for_approval(user)
    diagnosis = api.get(f"/api/tasks/{waiting.pk}/").json()["diagnosis"]
    assert diagnosis["waiting_on"]["detail"] == "approval: Refund 42?"
    assert diagnosis["status"] == "suspended" and diagnosis["last_error"] is None
