"""GET /api/tasks/{id}/audit/ and /checkpoints/: ordered, paged by seq or step."""

from __future__ import annotations

import pytest

from audit.models import AuditEvent
from tests.api.factories import completed

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_audit_trail_pages_in_order_by_seq(api, user):
    task = completed(user)
    total = AuditEvent.objects.filter(task=task).count()
    seen, url, pages = [], f"/api/tasks/{task.pk}/audit/?limit=3", 0
    while url:
        page = api.get(url).json()
        seen += page["results"]
        url, pages = page["next"], pages + 1
    assert [e["seq"] for e in seen] == list(range(1, total + 1))
    assert pages == -(-total // 3)
    assert seen[0]["type"] == "created" and seen[0]["summary"] == "scripted 1.0 accepted"
    assert seen[-1]["type"] == "transition" and seen[-1]["payload"]["to"] == "completed"


def test_after_starts_past_a_seq(api, user):
    task = completed(user)
    page = api.get(f"/api/tasks/{task.pk}/audit/", {"after": 4, "limit": 2}).json()
    assert [e["seq"] for e in page["results"]] == [5, 6]
    assert "after=6" in page["next"]


@pytest.mark.parametrize(
    ("query", "field"),
    [({"after": "-1"}, "after"), ({"limit": "0"}, "limit"), ({"limit": "5000"}, "limit")],
)
def test_bad_paging_parameters_are_400(api, user, query, field):
    task = completed(user)
    response = api.get(f"/api/tasks/{task.pk}/audit/", query)
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_checkpoints_page_in_step_order(api, user):
    task = completed(user)
    first = api.get(f"/api/tasks/{task.pk}/checkpoints/", {"limit": 2}).json()
    assert [c["step"] for c in first["results"]] == [0, 1]
    assert first["results"][0]["state"] == {"pc": 0, "last": None}
    rest = api.get(first["next"]).json()
    assert [c["step"] for c in rest["results"]] == list(range(2, task.current_step))
    assert rest["next"] is None
