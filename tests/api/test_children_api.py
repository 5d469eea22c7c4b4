"""``GET /api/tasks/{id}/children/`` and a child's ``parent``: the links between a task
and the children its steps started, seen only by who may see the parent."""

from __future__ import annotations

import pytest

from agents.models import AgentTask
from audit.services import audit_verify
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)

CHILDREN = [
    {"agent": "scripted", "input": {"script": [{"final": "one"}]}},
    {"agent": "scripted", "input": {"script": [{"wait_event": "go"}, {"final": "two"}]}},
]


def _parent(api) -> str:
    response = api.post(
        "/api/tasks/",
        {"agent": "scripted", "input": {"script": [{"spawn": CHILDREN, "join": "all"}]}},
        format="json",
    )
    assert response.status_code == 201, response.json()
    return response.json()["id"]


def test_children_are_listed_in_spawn_order_and_link_back_to_their_parent(api):
    parent = _parent(api)
    run_until_idle()
    detail = api.get(f"/api/tasks/{parent}/").json()
    assert detail["status"] == "suspended"
    assert detail["diagnosis"]["waiting_on"]["kind"] == "children"
    assert "1 of 2 completed, 1 live; join all" in detail["diagnosis"]["summary"]
    children = api.get(f"/api/tasks/{parent}/children/").json()
    assert [c["spawn_index"] for c in children] == [0, 1]
    assert [c["status"] for c in children] == ["completed", "suspended"]
    assert {c["parent"] for c in children} == {parent}
    child = api.get(f"/api/tasks/{children[1]['id']}/").json()
    assert child["parent"] == parent and child["spawn_step"] == 1
    assert api.get(f"/api/tasks/{parent}/").json()["parent"] is None
    signal = api.post(
        f"/api/tasks/{children[1]['id']}/signal/", {"name": "go", "payload": 1}, format="json"
    )
    assert signal.status_code == 201, signal.json()
    run_until_idle()
    body = api.get(f"/api/tasks/{parent}/").json()
    assert body["status"] == "completed"
    assert body["result"] == ["one", "two"]
    tasks = AgentTask.objects.all()
    report = audit_verify(tasks=[(t.pk, t.audit_seq) for t in tasks])
    assert report.breaks == [] and report.tasks == 3


def test_another_owner_sees_neither_the_parent_nor_its_children(api, other_api):
    parent = _parent(api)
    run_until_idle()
    assert other_api.get(f"/api/tasks/{parent}/children/").status_code == 404
    child = AgentTask.objects.filter(parent_id=parent).first()
    assert other_api.get(f"/api/tasks/{child.pk}/").status_code == 404
    assert child.owner.get_username() == "alice"
