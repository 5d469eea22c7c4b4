"""GET /api/breakers/: every circuit breaker's state, for staff."""

from __future__ import annotations

import pytest

from tools import breakers

pytestmark = pytest.mark.django_db(transaction=True)


def test_staff_see_every_breaker_and_its_state(staff_api):
    breakers.force_open("payments-api", actor="user:olga")
    try:
        response = staff_api.get("/api/breakers/")
        assert response.status_code == 200
        by_name = {b["name"]: b for b in response.json()}
        assert by_name["payments-api"]["state"] == "open"
        assert by_name["payments-api"]["forced"] is True
    finally:
        breakers.force_close("payments-api", actor="user:olga")
    after = {b["name"]: b for b in staff_api.get("/api/breakers/").json()}
    assert after["payments-api"]["state"] == "closed"


def test_breakers_are_not_for_other_users(api):
    response = api.get("/api/breakers/")
    assert response.status_code == 403
    assert response.json()["error"] == "permission_denied"
