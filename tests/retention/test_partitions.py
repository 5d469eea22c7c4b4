"""Issue 24: retention drops the audit trail's ended months instead of deleting rows.

Tasks made by the real runtime are moved to past months (their chains sealed again as
if written then, ``tests.audit.test_partitions.relocate``). Retention archives and
removes them; their events in ended months wait for the month's partition, which the
same run drops once every task in it is removed, with an append-only record; a held
task keeps its partition (and the removed tasks' events there go by rows after
``partition_purge_after_days``); a removed task waiting for its partition restores.
"""

from __future__ import annotations

from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from agents.models import AgentTask
from agents.retention import retention_run, task_legal_hold_set
from audit.models import AuditEvent, AuditPartitionRemoval, TaskRemoval
from audit.partitions import partitions_ensure, partitions_list
from tests.api.factories import completed
from tests.audit.test_partitions import intact, month_ago, month_name, partitions_of, relocate
from tests.retention.test_retention import REMOVE, archives, policy, refused, storage  # noqa: F401, F811

pytestmark = pytest.mark.django_db(transaction=True)


def in_the_past(*tasks: AgentTask, months: int = 3, span: bool = False) -> datetime:
    """Move each task's events ``months`` back (with ``span``, from the 3rd event on one
    month later), its partitions made first; returns the first month's time."""
    then = month_ago(months, day=27)
    partitions_ensure(now=datetime.now(UTC), since=then)
    for task in tasks:
        relocate(task, {1: then, 3: month_ago(months - 1) if span else then})
    return then


def test_retention_drops_a_month_whose_tasks_are_all_removed_and_records_it(user, storage):  # noqa: F811
    spanning, inside = completed(user), completed(user)
    three = in_the_past(spanning, span=True)
    in_the_past(inside)
    two = month_ago(2)
    assert partitions_of(spanning) == [month_name(three), month_name(two)]
    events = {t.pk: t.audit_seq for t in (spanning, inside)}
    with policy(REMOVE):
        report = retention_run(storage=storage)
    assert sorted(report.removed) == sorted(str(pk) for pk in events)
    assert report.partitions.dropped[month_name(three)] == 2 + events[inside.pk]
    assert report.partitions.dropped[month_name(two)] == events[spanning.pk] - 2
    assert month_name(three) not in {p.name for p in partitions_list()}
    assert not AuditEvent.objects.filter(task_id__in=list(events)).exists()
    assert TaskRemoval.objects.filter(task_id__in=list(events)).count() == 2

    record = AuditPartitionRemoval.objects.get(name=month_name(three))
    assert (record.tasks, record.events) == (2, 2 + events[inside.pk])
    assert record.actor.startswith("retention:")
    assert record.range_start == datetime(three.year, three.month, 1, tzinfo=UTC)
    for sql in (
        "DELETE FROM audit_auditpartitionremoval",
        "UPDATE audit_auditpartitionremoval SET events = 0",
    ):
        refused(sql, match="append-only")
    # The archives carry the chains, across both months.
    for path in archives(storage):
        out = StringIO()
        call_command("audit_verify", "--archive", str(path), stdout=out)
        assert "0 break(s)" in out.getvalue()


def test_a_held_task_keeps_its_partition_and_the_removed_ones_go_by_rows_later(user, storage):  # noqa: F811
    held, other = completed(user), completed(user)
    task_legal_hold_set(task_id=held.pk, held=True, reason="litigation 9")
    held.refresh_from_db()
    then = in_the_past(held, other)
    name = month_name(then)
    with policy({**REMOVE, "partition_purge_after_days": 365}):
        report = retention_run(storage=storage)
    assert report.removed == [str(other.pk)]
    assert name in report.partitions.waiting and name not in report.partitions.dropped
    # Removed: its row is gone, its events wait in the month's partition.
    assert not AgentTask.objects.filter(pk=other.pk).exists()
    assert AuditEvent.objects.filter(task_id=other.pk).count() == other.audit_seq
    refused("SELECT audit_partition_drop(%s, 'me')", [name], match="still in the database")

    with policy({**REMOVE, "partition_purge_after_days": 0}):
        report = retention_run(storage=storage)
    assert report.partitions.purged == {name: 1}
    assert not AuditEvent.objects.filter(task_id=other.pk).exists()
    assert name in {p.name for p in partitions_list()}
    assert partitions_of(held) == [name]
    assert intact(held, held.audit_seq)
    assert not AuditPartitionRemoval.objects.filter(name=name).exists()


def test_a_removed_task_waiting_for_its_partition_is_restored(user, storage):  # noqa: F811
    held, task = completed(user), completed(user)
    task_legal_hold_set(task_id=held.pk, held=True)
    in_the_past(held, task)
    with policy({**REMOVE, "partition_purge_after_days": 365}):
        assert retention_run(storage=storage).removed == [str(task.pk)]
    assert AuditEvent.objects.filter(task_id=task.pk).count() == task.audit_seq
    [path] = [p for p in archives(storage) if p.name.startswith(str(task.pk))]
    call_command("retention", "restore", str(path), stdout=StringIO())
    assert AuditEvent.objects.filter(task_id=task.pk).count() == task.audit_seq + 1
    assert intact(task, task.audit_seq + 1)


def test_a_task_with_a_trail_and_no_removal_record_cannot_be_deleted(user):
    task = completed(user)
    refused("DELETE FROM agents_agenttask WHERE id = %s", [task.pk], match="no removal record")
    assert AgentTask.objects.filter(pk=task.pk).exists()


def test_a_retention_run_makes_the_coming_months_partitions(user, storage):  # noqa: F811
    ahead = month_ago(-3)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {month_name(ahead)}")
    with policy(REMOVE):
        report = retention_run(storage=storage)
    assert month_name(ahead) in report.partitions_made
    assert month_name(ahead) in {p.name for p in partitions_list()}


def test_a_month_not_ended_is_never_dropped(user):
    refused(
        "SELECT audit_partition_drop(%s, 'me')",
        [month_name(datetime.now(UTC))],
        match="has not ended",
    )
    refused("SELECT audit_partition_drop('audit_auditevent_default', 'me')", match="not a month")
