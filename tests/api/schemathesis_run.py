"""schemathesis against the OpenAPI schema (``tests/api/test_schema*.py``), on a live
server, authenticated with a token: no 5xx, no response that breaks the schema (status,
content type, headers, body), and no schema-violating request accepted.

The run is schemathesis's own CLI (4.x): its examples, coverage, fuzzing and stateful
phases, in positive and negative modes, with a fixed seed so CI is repeatable (set
``SCHEMATHESIS_SEED`` to explore). Its report lands in ``var/<namespace>/schemathesis``.
Each run takes minutes: each is a test file of its own, so that pytest-xdist runs
them in parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from django.conf import settings as django_settings
from rest_framework.authtoken.models import Token

from agents.models import AgentTask, TaskStatus
from tests.api.factories import completed, dead_lettered, started, waiting_for_approval
from tests.helpers import run_until_idle

# Every check but one: the schema cannot say which inputs an agent accepts (that is the
# agent's own validate_input), so schema-valid bodies that the agent refuses are fine.
EXCLUDED_CHECKS = "positive_data_acceptance"
# The event stream stays open as long as its task runs (tasks here wait for approvals
# forever): it is tested with a real SSE client in tests/integration/test_event_stream.py.
# Rotating the caller's token would end the run's authentication: it is tested in
# tests/api/test_auth_throttling.py.
EXCLUDED_PATHS = ("/api/tasks/{id}/events/", "/api/token/rotate/")


def two_tenants_check(live_server, settings, *, alice, caller, who: str) -> None:
    """Issue 12: schemathesis as ``caller`` (a tenant, or staff without permissions)
    with ``alice``'s objects in the database: every path id is also tried with alice's
    ids, every body also nested 65 and 10,000 levels deep
    (``tests/api/schemathesis_hooks.py``). No 5xx, no response carrying alice's data,
    nothing the schema does not allow; ``who`` names the run's report."""
    unthrottled(settings)
    marker = f"alice-private-{uuid.uuid4().hex}"
    mine = {"script": [{"think": marker}, {"approval": f"refund {marker}?"}, {"final": marker}]}
    foreign = [
        started(alice, mine),
        started(alice, {"script": [{"think": marker}, {"wait_event": "paid"}, {"final": 1}]}),
    ]
    run_until_idle()
    letter_task, letter = dead_lettered(alice)
    foreign.append(letter_task)
    # The caller's own objects, for the stateful phase to find.
    waiting_for_approval(caller)
    completed(caller)
    dead_lettered(caller)
    token = Token.objects.create(user=caller)
    checked = Path(django_settings.VAR_DIR) / "schemathesis" / f"{who}-checked.txt"
    checked.parent.mkdir(parents=True, exist_ok=True)
    checked.unlink(missing_ok=True)
    env = {
        "SCHEMA_CHECK_LOG": str(checked),
        "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
        "SCHEMA_FOREIGN_TASK_IDS": ",".join(str(t.pk) for t in foreign),
        "SCHEMA_FOREIGN_LETTER_IDS": str(letter.pk),
        "SCHEMA_FOREIGN_MARKER": marker,
    }
    schemathesis(live_server, token, who, env)
    # The check ran, on requests naming alice's objects and on deeply nested bodies.
    lines = [line.split() for line in checked.read_text().splitlines()]
    assert len(lines) > 500
    foreign_statuses = {int(status) for status, foreign, _ in lines if foreign == "1"}
    assert len([1 for _, foreign, _ in lines if foreign == "1"]) > 50
    assert foreign_statuses <= {400, 401, 403, 404, 405, 406, 409, 415}, foreign_statuses
    assert 404 in foreign_statuses
    deep_statuses = [int(status) for status, _, deep in lines if deep == "1"]
    assert len(deep_statuses) > 50
    assert set(deep_statuses) <= {400, 401, 403, 404, 405, 406, 409, 413, 415}
    # Nothing of alice's changed.
    assert {t.status for t in AgentTask.objects.filter(owner=alice)} == {
        TaskStatus.SUSPENDED,
        TaskStatus.DEAD_LETTERED,
    }
    assert not AgentTask.objects.filter(replayed_from__owner=alice).exclude(owner=alice).exists()


def unthrottled(settings) -> None:
    """No API throttling: a run sends thousands of requests as one user (throttling is
    tested in tests/api/test_auth_throttling.py)."""
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"user": "1000000/minute"},
    }


def schemathesis(live_server, token, name: str, env: dict[str, str]) -> str:
    """Run schemathesis's CLI on ``live_server`` with ``token``; its report goes to
    ``var/<namespace>/schemathesis/<name>``. Fails the test unless every check passed."""
    report_dir = Path(django_settings.VAR_DIR) / "schemathesis" / name
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
    # Run from the report directory: schemathesis keeps its cache (.schemathesis/) there;
    # the project root on PYTHONPATH lets it import the hooks module.
    root = str(Path(__file__).resolve().parents[2])
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=1100,
        cwd=report_dir,
        env={**os.environ, "PYTHONPATH": root, **env},
    )
    output = run.stdout + run.stderr
    print(output[-4000:])
    assert run.returncode == 0, output[-20000:]
    assert " passed" in output, output[-5000:]
    return output
