"""POST/GET /api/tasks/: creation, idempotency, validation naming the field, who sees what."""

from __future__ import annotations

import json

import pytest
from django.conf import settings

from agents.models import AgentTask, Checkpoint
from audit.models import AuditEvent
from tests.api.factories import SIMPLE, completed, started
from tests.helpers import queue_depth

pytestmark = pytest.mark.django_db(transaction=True)


def _nothing_created() -> None:
    assert AgentTask.objects.count() == 0
    assert Checkpoint.objects.count() == 0
    assert AuditEvent.objects.count() == 0
    assert queue_depth() == 0


def test_create_starts_a_task_and_returns_201(api, user):
    response = api.post("/api/tasks/", {"agent": "scripted", "input": SIMPLE}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    task = AgentTask.objects.get(pk=body["id"])
    assert task.owner == user
    assert body["status"] == "pending" and body["agent"] == "scripted"
    assert body["input"] == SIMPLE and body["owner"] == "alice"
    assert response["Location"] == f"/api/tasks/{task.pk}/"
    assert queue_depth() == 1


def test_the_same_idempotency_key_returns_the_existing_task_with_200(api):
    data = {"agent": "scripted", "input": SIMPLE, "idempotency_key": "order-17"}
    first = api.post("/api/tasks/", data, format="json")
    again = api.post("/api/tasks/", data, format="json")
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert AgentTask.objects.count() == 1 and queue_depth() == 1


def test_a_deadline_is_set_from_timeout_seconds(api):
    data = {"agent": "scripted", "input": SIMPLE, "timeout_seconds": 30}
    body = api.post("/api/tasks/", data, format="json").json()
    assert body["deadline"] is not None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"input": SIMPLE}, "agent"),
        ({"agent": 7, "input": SIMPLE}, "agent"),
        ({"agent": "nope", "input": SIMPLE}, "agent"),
        ({"agent": "scripted"}, "input"),
        ({"agent": "scripted", "input": None}, "input"),
        ({"agent": "scripted", "input": {"script": []}}, "input.script"),
        ({"agent": "scripted", "input": {"script": [{"think": 1}]}}, "input.script[0].think"),
        ({"agent": "scripted", "input": {"script": [{"final": "a\u0000b"}]}}, "input"),
        ({"agent": "scripted", "input": SIMPLE, "timeout_seconds": "10"}, "timeout_seconds"),
        ({"agent": "scripted", "input": SIMPLE, "timeout_seconds": -1}, "timeout_seconds"),
        ({"agent": "scripted", "input": SIMPLE, "timeout_seconds": True}, "timeout_seconds"),
        ({"agent": "scripted", "input": SIMPLE, "idempotency_key": ""}, "idempotency_key"),
        ({"agent": "scripted", "input": SIMPLE, "idempotency_key": 5}, "idempotency_key"),
        ({"agent": "scripted", "input": SIMPLE, "idempotency_key": "k" * 201}, "idempotency_key"),
    ],
)
def test_bad_input_is_400_naming_the_field_and_creates_nothing(api, data, field):
    response = api.post("/api/tasks/", data, format="json")
    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["error"] == "invalid"
    assert body["field"] == field, body
    assert field in body["detail"] or body["detail"]
    _nothing_created()


def test_an_input_over_the_limit_is_400_naming_input(api):
    limit = settings.AGENTS["MAX_INPUT_BYTES"]
    data = {"agent": "scripted", "input": {"script": [{"final": "x" * (limit + 10)}]}}
    response = api.post("/api/tasks/", data, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "input"
    assert str(limit) in response.json()["detail"]
    _nothing_created()


def test_a_body_over_the_upload_limit_is_413_before_it_is_parsed(api):
    body = json.dumps({"agent": "scripted", "input": {"pad": "x" * 100}})
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    big = body[:-2] + " " * (limit + 1) + body[-2:]
    response = api.post("/api/tasks/", big, content_type="application/json")
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert str(limit) in response.json()["detail"]
    _nothing_created()


@pytest.mark.parametrize(
    "raw", ['{"agent": "scripted", "input": ', '{"agent": "scripted", "input": NaN}', "\xff"]
)
def test_malformed_json_is_400(api, raw):
    response = api.post("/api/tasks/", raw, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "parse_error"
    _nothing_created()


def test_a_body_that_is_not_json_is_415(api):
    response = api.post("/api/tasks/", "agent=scripted", content_type="text/plain")
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"


def test_requests_without_credentials_are_401(client):
    response = client.get("/api/tasks/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert response.json()["error"] == "not_authenticated"


def test_a_bad_token_is_401(client):
    response = client.get("/api/tasks/", HTTP_AUTHORIZATION="Token not-a-token")
    assert response.status_code == 401
    assert response.json()["error"] == "authentication_failed"


def test_session_login_works_for_the_browser(client, user):
    client.force_login(user)
    assert client.get("/api/tasks/").status_code == 200


def test_a_user_sees_only_their_tasks_and_another_users_task_is_404(
    api, other_api, staff_api, user, other_user
):
    mine = started(user)
    theirs = started(other_user)
    listed = [t["id"] for t in api.get("/api/tasks/").json()["results"]]
    assert listed == [str(mine.pk)]
    assert api.get(f"/api/tasks/{mine.pk}/").status_code == 200
    for path in ("", "audit/", "checkpoints/"):
        response = api.get(f"/api/tasks/{theirs.pk}/{path}")
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found"
    for path, data in (
        ("approve/", {"approved": True}),
        ("signal/", {"name": "x"}),
        ("cancel/", None),
        ("replay/", {}),
    ):
        response = api.post(f"/api/tasks/{theirs.pk}/{path}", data, format="json")
        assert response.status_code == 404, path
    theirs.refresh_from_db()
    assert theirs.status == "pending" and AgentTask.objects.count() == 2
    everyone = {t["id"] for t in staff_api.get("/api/tasks/").json()["results"]}
    assert everyone == {str(mine.pk), str(theirs.pk)}
    assert staff_api.get(f"/api/tasks/{theirs.pk}/").status_code == 200


def test_a_malformed_task_id_is_404(api):
    assert api.get("/api/tasks/not-a-uuid/").status_code == 404


def test_list_filters_by_status_and_agent_and_pages(api, user):
    done = completed(user)
    pending = [started(user) for _ in range(3)]
    by_status = api.get("/api/tasks/", {"status": "completed"}).json()["results"]
    assert [t["id"] for t in by_status] == [str(done.pk)]
    assert "input" not in by_status[0]
    assert api.get("/api/tasks/", {"agent": "other"}).json()["results"] == []
    assert len(api.get("/api/tasks/", {"agent": "scripted"}).json()["results"]) == 4

    first = api.get("/api/tasks/", {"page_size": 2}).json()
    second = api.get(first["next"]).json()
    ids = [t["id"] for t in first["results"] + second["results"]]
    assert ids == [str(t.pk) for t in reversed(pending)] + [str(done.pk)]
    assert second["next"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "sleeping"}, "status"),
        ({"page_size": "0"}, "page_size"),
        ({"page_size": "abc"}, "page_size"),
        ({"page_size": "201"}, "page_size"),
        ({"cursor": "garbage"}, "cursor"),
    ],
)
def test_bad_list_parameters_are_400_naming_them(api, query, field):
    response = api.get("/api/tasks/", query)
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_an_unknown_field_is_400_naming_it(api):
    data = {"agent": "scripted", "input": SIMPLE, "timeout": 30}
    response = api.post("/api/tasks/", data, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "timeout"
    _nothing_created()


@pytest.mark.parametrize("query", [{"status": ""}, {"agent": ""}])
def test_an_empty_filter_is_400(api, query):
    assert api.get("/api/tasks/", query).status_code == 400


def test_unknown_api_urls_are_json_404s(api):
    response = api.get("/api/tasks")
    assert response.status_code == 404
    assert "did you mean /api/tasks/" in response.json()["detail"]
    assert api.get("/api/nothing/here/").json()["error"] == "not_found"
