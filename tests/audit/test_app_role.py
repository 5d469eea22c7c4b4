"""Issue 23, item 1: the app runs as a database role that can only read and insert the
audit trail (``manage.py db_app_role``, run by the owner after migrate), so the app's
own credentials can neither rewrite it nor disable its append-only trigger."""

from __future__ import annotations

import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.db.utils import ProgrammingError

from agents.models import AgentTask
from agents.services import task_start
from audit.models import AuditEvent
from tests.api.factories import completed

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def app_role(monkeypatch):
    role = f"sec_app_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("APP_DATABASE_URL", f"postgres://{role}:pw-{role}@127.0.0.1/x")
    yield role
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
        if cursor.fetchone():
            cursor.execute(f"DROP OWNED BY {role}")
            cursor.execute(f"DROP ROLE {role}")


def as_role(role: str, statement: str, params: list | None = None) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL ROLE {role}")
        cursor.execute(statement, params)


def test_the_app_role_runs_tasks_but_cannot_rewrite_the_audit_trail(user, app_role):
    task = completed(user)
    out = StringIO()
    call_command("db_app_role", stdout=out)
    assert "SELECT and INSERT only on audit_auditevent" in out.getvalue()
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = %s", [app_role])
        assert cursor.fetchone() == (True, False)

    # What the app does works as that role: a task and its audit events are written.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL ROLE {app_role}")
        started, _ = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})
        AgentTask.objects.filter(pk=started.pk).update(updated_at=started.updated_at)
        assert AuditEvent.objects.filter(task=started).exists()

    # What a tamperer does with the app's credentials does not.
    refused = [
        ("UPDATE audit_auditevent SET payload = '{}' WHERE task_id = %s", "permission denied"),
        ("DELETE FROM audit_auditevent WHERE task_id = %s", "permission denied"),
        ("TRUNCATE audit_auditevent CASCADE", "permission denied"),
        ("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only", "must be owner"),
        ("ALTER TABLE audit_auditevent DISABLE TRIGGER ALL", "must be owner"),
        ("UPDATE audit_auditchainstart SET unchained_through_id = 999999999", "permission denied"),
        ("DELETE FROM audit_auditchainstart", "permission denied"),
        ("INSERT INTO django_migrations (app, name, applied) VALUES ('a', 'b', now())", "denied"),
    ]
    for statement, message in refused:
        params = [task.pk] if "%s" in statement else None
        with pytest.raises(ProgrammingError, match=message):
            as_role(app_role, statement, params)
    assert AuditEvent.objects.filter(task=task).count() == task.audit_seq
    assert "intact" in _verify()


def _verify() -> str:
    out = StringIO()
    call_command("audit_verify", "--all", stdout=out, stderr=StringIO())
    return out.getvalue()


def test_the_command_is_idempotent_and_refuses_roles_that_could_undo_it(app_role):
    call_command("db_app_role", stdout=StringIO())
    call_command("db_app_role", stdout=StringIO())  # after the next migrate: the same
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user")
        (owner,) = cursor.fetchone()
    with pytest.raises(CommandError, match="running this command"):
        call_command("db_app_role", role=owner, stdout=StringIO())
    with pytest.raises(CommandError, match="not a plain role name"):
        call_command("db_app_role", role="x; DROP TABLE y", stdout=StringIO())
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE audit_auditchainstart OWNER TO {app_role}")
    try:
        with pytest.raises(CommandError, match="owns audit_auditchainstart"):
            call_command("db_app_role", stdout=StringIO())
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE audit_auditchainstart OWNER TO {owner}")
