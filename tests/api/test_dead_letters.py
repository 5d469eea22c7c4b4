"""GET /api/dead-letters/ and POST /api/dead-letters/{id}/requeue/."""

from __future__ import annotations

import pytest

from agents.models import TaskStatus
from tests.api.factories import dead_lettered

pytestmark = pytest.mark.django_db(transaction=True)


def test_dead_letters_are_listed_for_their_owner_and_staff_only(api, other_api, staff_api, user):
    task, letter = dead_lettered(user)
    mine = api.get("/api/dead-letters/").json()["results"]
    assert [(d["id"], d["task"], d["task_status"]) for d in mine] == [
        (letter.pk, str(task.pk), "dead_lettered")
    ]
    assert mine[0]["reason"] == "retries_exhausted" and "upstream is down" in mine[0]["error"]
    assert other_api.get("/api/dead-letters/").json()["results"] == []
    assert len(staff_api.get("/api/dead-letters/", {"open": "true"}).json()["results"]) == 1
    assert staff_api.get("/api/dead-letters/", {"open": "false"}).json()["results"] == []
    by_task = staff_api.get("/api/dead-letters/", {"task": str(task.pk)}).json()["results"]
    assert len(by_task) == 1


def test_requeue_sends_the_task_back_to_work_once(api, other_api, user):
    task, letter = dead_lettered(user)
    assert other_api.post(f"/api/dead-letters/{letter.pk}/requeue/").status_code == 404
    response = api.post(f"/api/dead-letters/{letter.pk}/requeue/")
    assert response.status_code == 200, response.json()
    assert response.json()["status"] == TaskStatus.RUNNING
    letter.refresh_from_db()
    assert letter.requeued_by == "user:alice"
    again = api.post(f"/api/dead-letters/{letter.pk}/requeue/")
    assert again.status_code == 409
    assert api.get("/api/dead-letters/", {"open": "true"}).json()["results"] == []


@pytest.mark.parametrize("letter_id", ["abc", "0", "99999999999999999999999"])
def test_a_malformed_or_unknown_dead_letter_is_404(api, letter_id):
    assert api.post(f"/api/dead-letters/{letter_id}/requeue/").status_code == 404


def test_bad_filters_are_400(api):
    response = api.get("/api/dead-letters/", {"task": "nope"})
    assert response.status_code == 400 and response.json()["field"] == "task"
