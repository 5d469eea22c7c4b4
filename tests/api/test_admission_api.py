"""The API says a task waits for admission (fair sharing, ``agents.core.admission``)."""

from __future__ import annotations

import pytest

from tests.api.factories import started

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_task_over_its_owners_limit_says_it_waits_for_admission(api, user, settings):
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": 1}
    first = started(user)
    second = started(user)
    body = api.get(f"/api/tasks/{second.pk}/").json()
    assert body["status"] == "pending"
    assert body["diagnosis"]["waiting_on"]["kind"] == "admission"
    assert body["diagnosis"]["summary"].startswith("Waiting for admission")
    own = api.get(f"/api/tasks/{first.pk}/").json()
    assert own["diagnosis"]["waiting_on"]["kind"] == "worker"
