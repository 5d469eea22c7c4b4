"""Issue 12, finding 7: the audit trail is tamper-evident.

An attacker with the table owner's rights disables the append-only trigger and edits,
deletes or inserts an event with raw SQL; ``audit_verify`` finds each one. The app
role has no TRUNCATE, and a role that does not own the table can neither truncate it
nor disable its trigger.
"""

from __future__ import annotations

import json
import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.db.utils import ProgrammingError

from audit.models import AuditEvent
from tests.api.factories import completed

pytestmark = pytest.mark.django_db(transaction=True)


def inserting(sql: str, params: list) -> None:
    """An INSERT needs no trickery: the trigger only guards UPDATE and DELETE."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)


def tampering(sql: str, params: list) -> None:
    """Run ``sql`` with the append-only trigger disabled, as the table's owner could."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only")
        cursor.execute(sql, params)
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only")


def verify(*args: str) -> str:
    out, err = StringIO(), StringIO()
    call_command("audit_verify", *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def broken(*args: str) -> str:
    err = StringIO()
    with pytest.raises(CommandError, match="audit trail broken") as refused:
        call_command("audit_verify", *args, stdout=StringIO(), stderr=err)
    return err.getvalue() + str(refused.value)


def test_an_untouched_trail_verifies(user, other_user):
    tasks = [completed(user), completed(other_user)]
    assert "0 break(s)" in verify("--all")
    assert "intact" in verify(str(tasks[0].pk))
    events = AuditEvent.objects.filter(task=tasks[0]).order_by("seq")
    assert all(len(e.hash) == 64 for e in events)
    assert len({e.hash for e in events}) == len(events)


@pytest.mark.parametrize(
    ("sql", "field"),
    [
        ("UPDATE audit_auditevent SET payload = %s WHERE task_id = %s AND seq = 2", "payload"),
        ("UPDATE audit_auditevent SET actor = %s WHERE task_id = %s AND seq = 2", "actor"),
        ("UPDATE audit_auditevent SET type = %s WHERE task_id = %s AND seq = 2", "type"),
    ],
)
def test_an_edited_event_is_found(user, sql, field):
    task = completed(user)
    other = completed(user)
    value = {
        "payload": json.dumps({"approved": True}),
        "actor": "user:mallory",
        "type": "approval_decided",
    }[field]
    tampering(sql, [value, task.pk])
    report = broken("--all")
    assert f"task {task.pk}: event #2: its content does not match its hash (changed)" in report
    assert str(other.pk) not in report
    assert "intact" in verify(str(other.pk))


def test_a_deleted_event_is_found(user):
    task = completed(user)
    tampering("DELETE FROM audit_auditevent WHERE task_id = %s AND seq = 3", [task.pk])
    report = broken(str(task.pk))
    assert "event #4: events #3 are missing (removed)" in report
    assert "does not follow the event before it" in report


def test_deleting_the_last_events_is_found(user):
    task = completed(user)
    last = AuditEvent.objects.filter(task=task).count()
    tampering("DELETE FROM audit_auditevent WHERE task_id = %s AND seq >= %s", [task.pk, last - 1])
    assert "the last ones were removed" in broken(str(task.pk))


def test_an_inserted_event_is_found(user):
    task = completed(user)
    count = AuditEvent.objects.filter(task=task).count()
    # Forged at the end, with a made-up hash, and in the middle by renumbering.
    inserting(
        "INSERT INTO audit_auditevent (task_id, seq, type, step, payload, actor, created_at,"
        " hash) SELECT task_id, seq + 1, 'approval_decided', step, '{}', actor,"
        " created_at, sha256(hash) FROM audit_auditevent"
        " WHERE task_id = %s AND seq = %s",
        [task.pk, count],
    )
    report = broken(str(task.pk))
    assert f"event #{count + 1}: beyond the {count} events the task recorded (inserted)" in report
    assert "does not match its hash" in report


def test_an_event_inserted_in_the_middle_is_found(user):
    task = completed(user)
    tampering(
        "UPDATE audit_auditevent SET seq = seq + 1000 WHERE task_id = %s AND seq >= 3",
        [task.pk],
    )
    tampering(
        "UPDATE audit_auditevent SET seq = seq - 999 WHERE task_id = %s AND seq > 1000",
        [task.pk],
    )
    inserting(
        "INSERT INTO audit_auditevent (task_id, seq, type, step, payload, actor, created_at,"
        " hash) SELECT task_id, 3, 'approval_decided', step, '{}', actor,"
        " created_at, hash FROM audit_auditevent WHERE task_id = %s AND seq = 2",
        [task.pk],
    )
    report = broken(str(task.pk))
    assert "event #3" in report and "(changed)" in report


def test_the_command_refuses_an_unknown_task_and_needs_one_target():
    with pytest.raises(CommandError, match="no task"):
        call_command("audit_verify", str(uuid.uuid4()))
    with pytest.raises(CommandError, match="TASK_ID or --all"):
        call_command("audit_verify")


def test_the_app_role_has_no_truncate_on_the_audit_trail():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT acl::text FROM pg_class, unnest(relacl) AS acl "
            "WHERE relname = 'audit_auditevent'"
        )
        entries = [row[0] for row in cursor.fetchall()]
        cursor.execute("SELECT current_user")
        (role,) = cursor.fetchone()
    mine = [e for e in entries if e.startswith(f"{role}=")]
    assert mine, entries
    rights = mine[0].split("=", 1)[1].split("/", 1)[0]
    assert "D" not in rights and "a" in rights and "r" in rights  # no TRUNCATE


def test_a_non_owner_role_can_neither_truncate_nor_disable_the_trigger(user):
    completed(user)
    role = f"audit_app_{uuid.uuid4().hex[:8]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role}")
        cursor.execute(f"GRANT SELECT, INSERT ON audit_auditevent TO {role}")
        try:
            for statement, message in (
                ("TRUNCATE audit_auditevent CASCADE", "permission denied"),
                (
                    "ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only",
                    "must be owner",
                ),
            ):
                with pytest.raises(ProgrammingError, match=message), transaction.atomic():
                    cursor.execute(f"SET LOCAL ROLE {role}")
                    cursor.execute(statement)
        finally:
            cursor.execute(f"REVOKE ALL ON audit_auditevent FROM {role}")
            cursor.execute(f"DROP ROLE {role}")
    assert AuditEvent.objects.exists()
