"""Issue 23, item 1: the whole runtime runs as the app role ``db_app_role`` makes. A
real worker connected as that role (no table of its own, only SELECT and INSERT on the
audit trail) runs tasks with tools, an approval and a retry to completion, and the
trail it wrote verifies."""

from __future__ import annotations

import uuid
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from agents.core.suspensions import task_approve
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from tests.helpers import wait_until, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SCRIPT = [
    {"think": "plan"},
    {"tool": "calc", "args": {"expression": "6 * 7"}},
    {"approval": "go on?"},
    {"tool": "ledger.append", "args": {"key": "k", "value": 1}},
    {"final": "done"},
]


@pytest.fixture
def app_role_url(monkeypatch, transactional_db):
    role = f"sec_app_{uuid.uuid4().hex[:8]}"
    url = worker_env()["DATABASE_URL"].replace("://postgres@", f"://{role}:pw-{role}@", 1)
    assert role in url, url
    monkeypatch.setenv("APP_DATABASE_URL", url)
    call_command("db_app_role", stdout=StringIO())
    yield url
    with connection.cursor() as cursor:
        cursor.execute(f"DROP OWNED BY {role}")
        cursor.execute(f"DROP ROLE {role}")


def test_a_worker_running_as_the_app_role_completes_tasks(workers, user, app_role_url):
    workers.start(concurrency=2, DATABASE_URL=app_role_url)
    tasks = [
        task_start(owner=user, agent="scripted", input={"script": SCRIPT})[0] for _ in range(3)
    ]
    for task in tasks:
        wait_until(
            lambda t=task: AgentTask.objects.get(pk=t.pk).status == TaskStatus.SUSPENDED,
            timeout=90,
        )
        task_approve(task_id=task.pk, user=None, approved=True)
    for task in tasks:
        wait_until(
            lambda t=task: AgentTask.objects.get(pk=t.pk).status == TaskStatus.COMPLETED,
            timeout=90,
        )
    out = StringIO()
    call_command("audit_verify", "--all", stdout=out, stderr=StringIO())
    assert "intact" in out.getvalue() and "0 break(s)" in out.getvalue()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database()"
        )
        users = {row[0] for row in cursor.fetchall()}
    assert app_role_url.split("://", 1)[1].split(":", 1)[0] in users  # the worker's role
