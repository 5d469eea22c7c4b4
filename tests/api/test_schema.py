"""schemathesis against the OpenAPI schema, on a live server, authenticated with a token:
no 5xx, no response that breaks the schema (status, content type, headers, body), and
no schema-violating request accepted.

The run is schemathesis's own CLI (4.x): its examples, coverage, fuzzing and stateful
phases, in positive and negative modes, with a fixed seed so CI is repeatable (set
``SCHEMATHESIS_SEED`` to explore). Its report lands in ``var/<namespace>/schemathesis``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from rest_framework.authtoken.models import Token

from tests.api.factories import completed, dead_lettered, waiting_for_approval

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(1200)]

# Every check but one: the schema cannot say which inputs an agent accepts (that is the
# agent's own validate_input), so schema-valid bodies that the agent refuses are fine.
EXCLUDED_CHECKS = "positive_data_acceptance"
# The event stream stays open as long as its task runs (tasks here wait for approvals
# forever): it is tested with a real SSE client in tests/integration/test_event_stream.py.
EXCLUDED_PATHS = ("/api/tasks/{id}/events/",)


def test_generated_requests_get_no_5xx_and_only_responses_the_schema_allows(
    live_server, staff, settings
):
    # The run sends thousands of requests as one user; throttling is tested elsewhere.
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"user": "1000000/minute"},
    }
    token = Token.objects.create(user=staff)
    # Objects in every state the operations act on, for the stateful phase to find.
    waiting_for_approval(staff)
    completed(staff)
    dead_lettered(staff)
    report_dir = Path(django_settings.VAR_DIR) / "schemathesis"
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{live_server.url}/api/schema/",
        "--header",
        f"Authorization: Token {token.key}",
        "--checks",
        "all",
        "--exclude-checks",
        EXCLUDED_CHECKS,
        *(arg for path in EXCLUDED_PATHS for arg in ("--exclude-path", path)),
        "--mode",
        "all",
        "--max-examples",
        os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"),
        "--seed",
        os.environ.get("SCHEMATHESIS_SEED", "20250601"),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
    ]
    report_dir.mkdir(parents=True, exist_ok=True)
    # Run from the report directory: schemathesis keeps its cache (.schemathesis/) there.
    run = subprocess.run(command, capture_output=True, text=True, timeout=1100, cwd=report_dir)
    output = run.stdout + run.stderr
    print(output[-4000:])
    assert run.returncode == 0, output[-20000:]
    assert " passed" in output, output[-5000:]


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
    ],
)
def test_the_schema_describes_every_endpoint_of_the_design(client, path):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    assert path in schema["paths"]


def test_the_docs_page_is_served(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()
