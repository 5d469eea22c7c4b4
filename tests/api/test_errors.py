"""Backpressure and throttling: refusals a client should wait out (Retry-After)."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, Checkpoint
from tests.api.factories import SIMPLE

pytestmark = pytest.mark.django_db(transaction=True)


def test_when_the_broker_refuses_creation_is_503_with_retry_after_and_nothing_is_left(
    api, broker_unreachable
):
    response = api.post("/api/tasks/", {"agent": "scripted", "input": SIMPLE}, format="json")
    assert response.status_code == 503
    assert int(response["Retry-After"]) > 0
    assert response.json()["error"] == "unavailable"
    assert AgentTask.objects.count() == 0 and Checkpoint.objects.count() == 0


@pytest.fixture
def three_per_minute(settings):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"user": "3/minute"},
    }


def test_each_user_is_throttled_on_their_own_with_retry_after(api, other_api, three_per_minute):
    assert [api.get("/api/tasks/").status_code for _ in range(3)] == [200, 200, 200]
    refused = api.get("/api/tasks/")
    assert refused.status_code == 429
    assert 0 < int(refused["Retry-After"]) <= 60
    assert refused.json()["error"] == "throttled"
    assert other_api.get("/api/tasks/").status_code == 200
