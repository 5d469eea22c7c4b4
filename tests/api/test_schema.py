"""schemathesis against the OpenAPI schema, on a live server, authenticated with a token:
no 5xx, no response that breaks the schema (status, content type, headers, body), and
no schema-violating request accepted.

The run is schemathesis's own CLI (4.x): its examples, coverage, fuzzing and stateful
phases, in positive and negative modes, with a fixed seed so CI is repeatable (set
``SCHEMATHESIS_SEED`` to explore). Its report lands in ``var/<namespace>/schemathesis``.
This file runs it as an operator; the two-tenant runs are
``test_schema_as_a_tenant.py`` and ``test_schema_as_staff_without_permissions.py``
(``tests/api/schemathesis_run.py``).
"""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token

from tests.api.factories import completed, dead_lettered, waiting_for_approval
from tests.api.schemathesis_run import schemathesis, unthrottled

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(1500)]


def test_generated_requests_get_no_5xx_and_only_responses_the_schema_allows(
    live_server, staff, settings
):
    # The run sends thousands of requests as one user; throttling is tested elsewhere.
    unthrottled(settings)
    token = Token.objects.create(user=staff)
    # Objects in every state the operations act on, for the stateful phase to find.
    waiting_for_approval(staff)
    completed(staff)
    dead_lettered(staff)
    schemathesis(live_server, token, "operator", {})


@pytest.mark.parametrize(
    "path",
    [
        "/api/tasks/",
        "/api/tasks/{id}/",
        "/api/tasks/{id}/audit/",
        "/api/tasks/{id}/events/",
        "/api/tasks/{id}/checkpoints/",
        "/api/tasks/{id}/approve/",
        "/api/tasks/{id}/signal/",
        "/api/tasks/{id}/cancel/",
        "/api/tasks/{id}/replay/",
        "/api/dead-letters/",
        "/api/dead-letters/{id}/requeue/",
        "/api/breakers/",
        "/api/token/rotate/",
    ],
)
def test_the_schema_describes_every_endpoint_of_the_design(client, path):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    assert path in schema["paths"]


def test_the_docs_page_is_served(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()
