"""schemathesis as bob, a tenant, with another tenant's (alice's) objects in the database
(issue 12; ``tests/api/schemathesis_run.py``)."""

from __future__ import annotations

import pytest

from tests.api.schemathesis_run import two_tenants_check

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(1500)]


def test_two_tenants_no_5xx_no_cross_tenant_read_even_deeply_nested(
    live_server, user, other_user, settings
):
    two_tenants_check(live_server, settings, alice=user, caller=other_user, who="tenant")
