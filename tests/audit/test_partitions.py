"""Issue 24: the audit trail in monthly partitions (migration ``audit.0011``).

Events of one task in two months verify as one chain; an insert in a month with no
partition lands in the DEFAULT one, and moves into the month's partition when it is
made; UPDATE and DELETE stay refused through the parent and on a partition itself; the
migration moves an existing trail (ids, rows, chains) into partitions.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from agents.models import AgentTask
from audit.integrity import event_hash
from audit.models import AuditEvent
from audit.partitions import partitioned, partitions_ensure, partitions_list
from tests.api.factories import completed

pytestmark = pytest.mark.django_db(transaction=True)


def month_ago(months: int, day: int = 10) -> datetime:
    """A time ``months`` whole UTC months before this one, on ``day``."""
    now = datetime.now(UTC)
    index = now.year * 12 + now.month - 1 - months
    return datetime(index // 12, index % 12 + 1, day, 12, tzinfo=UTC)


def relocate(task: AgentTask, times: dict[int, datetime]) -> None:
    """What the tables' owner could do, here to make a task of the past: move the
    task's events to other times (``times``: seq -> time, the last one given for a seq
    applying to every later seq) and seal their chain again with the app's key, so it
    verifies as if written then."""
    events = list(AuditEvent.objects.filter(task=task).order_by("seq"))
    prev, at = "", None
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only")
        for event in events:
            at = times.get(event.seq, at)
            digest = event_hash(
                prev_hash=prev,
                task_id=task.pk,
                seq=event.seq,
                type=event.type,
                step=event.step,
                actor=event.actor,
                created_at=at,
                payload=event.payload,
            )
            cursor.execute(
                "UPDATE audit_auditevent SET created_at = %s, hash = %s WHERE id = %s",
                [at, bytes.fromhex(digest), event.pk],
            )
            prev = digest
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only")
    first = times[min(times)]
    AgentTask.objects.filter(pk=task.pk).update(
        created_at=first, updated_at=at, status_changed_at=at, finished_at=at
    )


def partitions_of(task: AgentTask) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT tableoid::regclass::text FROM audit_auditevent WHERE task_id = %s"
            " ORDER BY 1",
            [task.pk],
        )
        return [row[0] for row in cursor.fetchall()]


def verified(task: AgentTask) -> str:
    out = StringIO()
    call_command("audit_verify", str(task.pk), stdout=out, stderr=StringIO())
    return out.getvalue()


def intact(task: AgentTask, events: int) -> bool:
    """``audit_verify TASK_ID`` verifies ``events`` events and finds no break."""
    out = verified(task)
    return f" {events} event(s) verified" in out and " 0 break(s)" in out


def month_name(at: datetime) -> str:
    return f"audit_auditevent_p{at:%Y_%m}"


def test_the_trail_is_partitioned_by_month_with_a_default_and_months_ahead(user):
    assert partitioned()
    names = [p.name for p in partitions_list()]
    now = datetime.now(UTC)
    assert month_name(now) in names and names[-1] == "audit_auditevent_default"
    task = completed(user)
    assert partitions_of(task) == [month_name(now)]
    # Three months ahead are made by the migration and by every retention run.
    assert len([n for n in names if n > month_name(now) and n != names[-1]]) >= 3


def test_a_task_whose_events_span_two_months_verifies(user):
    task = completed(user)
    assert task.audit_seq >= 4
    two, one = month_ago(2, day=28), month_ago(1, day=2)
    partitions_ensure(now=datetime.now(UTC), since=two)
    relocate(task, {1: two, 3: one})
    assert partitions_of(task) == [month_name(two), month_name(one)]
    assert intact(task, task.audit_seq)
    # The API's audit page reads them in order across both.
    seqs = list(AuditEvent.objects.filter(task=task).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, task.audit_seq + 1))


def test_an_event_moved_across_partitions_still_breaks_the_chain(user):
    task = completed(user)
    two = month_ago(2)
    partitions_ensure(now=datetime.now(UTC), since=two)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only")
        cursor.execute(
            "UPDATE audit_auditevent SET created_at = %s WHERE task_id = %s AND seq = 2",
            [two, task.pk],
        )
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only")
    assert month_name(two) in partitions_of(task)
    err = StringIO()
    with pytest.raises(Exception, match="audit trail broken"):
        call_command("audit_verify", str(task.pk), stdout=StringIO(), stderr=err)
    assert "#2" in err.getvalue() and "changed" in err.getvalue()


def test_an_insert_in_a_month_with_no_partition_lands_in_default_and_moves_later(user):
    task = completed(user)
    far = month_ago(-30)
    # 30 months ahead: no partition (one left by an earlier run on a kept database goes).
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {month_name(far)}")
    relocate(task, {1: far})
    assert partitions_of(task) == ["audit_auditevent_default"]
    assert intact(task, task.audit_seq)
    made = partitions_ensure(now=far, months_ahead=0)
    assert made == [month_name(far)]
    assert partitions_of(task) == [month_name(far)]
    assert intact(task, task.audit_seq)
    assert AuditEvent.objects.filter(task=task).count() == task.audit_seq


@pytest.mark.parametrize("table", ["audit_auditevent", "PARTITION"])
def test_update_and_delete_stay_refused_on_the_parent_and_on_a_partition(user, table):
    task = completed(user)
    [partition] = partitions_of(task)
    table = partition if table == "PARTITION" else table
    for sql in (
        f"UPDATE {table} SET payload = '{{}}' WHERE task_id = %s",  # noqa: S608
        f"DELETE FROM {table} WHERE task_id = %s",  # noqa: S608
    ):
        with (
            pytest.raises(DatabaseError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(sql, [task.pk])
    assert AuditEvent.objects.filter(task=task).count() == task.audit_seq


def test_a_second_event_with_one_number_in_another_month_is_found(user):
    task = completed(user)
    two = month_ago(2)
    partitions_ensure(now=datetime.now(UTC), since=two)
    first = AuditEvent.objects.get(task=task, seq=1)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO audit_auditevent (task_id, seq, type, payload, actor, created_at, hash)"
            " VALUES (%s, 1, 'created', '{}', 'forger', %s, %s)",
            [task.pk, two, bytes.fromhex(first.hash)],
        )
    err = StringIO()
    with pytest.raises(Exception, match="audit trail broken"):
        call_command("audit_verify", str(task.pk), stdout=StringIO(), stderr=err)
    assert "inserted" in err.getvalue() or "changed" in err.getvalue()


def _migrate(target: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(target)


def _events() -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, task_id, seq, created_at, hash, tableoid::regclass::text"
            " FROM audit_auditevent ORDER BY id"
        )
        return cursor.fetchall()


def test_the_migration_moves_an_existing_trail_into_partitions(user):
    old, recent = completed(user), completed(user)
    three = month_ago(3, day=27)
    partitions_ensure(now=datetime.now(UTC), since=three)
    relocate(old, {1: three, 2: month_ago(2)})
    before = _events()
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    try:
        _migrate([("audit", "0009_growth_digest_bytes")])
        assert not partitioned()
        assert [row[:5] for row in _events()] == [row[:5] for row in before]
        _migrate(latest)
    finally:
        _migrate(latest)
    assert partitioned()
    after = _events()
    assert [row[:5] for row in after] == [row[:5] for row in before]
    for _, _, _, at, _, where in after:
        assert where == month_name(at), "each event in its month's partition"
    assert month_name(three) in {p.name for p in partitions_list()}
    for task in (old, recent):
        assert intact(task, task.audit_seq)
    # New events continue the ids, and the trail stays append-only.
    third = completed(user)
    assert AuditEvent.objects.filter(task=third).order_by("id").first().id > max(
        row[0] for row in before
    )
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(task=old).delete()


def test_the_admin_lists_events_and_the_api_pages_them(user, admin_client):
    task = completed(user)
    relocate(task, {1: month_ago(1), 3: datetime.now(UTC) - timedelta(minutes=5)})
    response = admin_client.get("/admin/audit/auditevent/")
    assert response.status_code == 200
    event = AuditEvent.objects.filter(task=task).first()
    assert admin_client.get(f"/admin/audit/auditevent/{event.pk}/change/").status_code == 200
