"""The audit trail's monthly partitions (PostgreSQL; migration ``audit.0011``).

``audit_auditevent`` is partitioned by RANGE on ``created_at``: one partition per UTC
month, ``audit_auditevent_pYYYY_MM``, and ``audit_auditevent_default`` for any time no
month partition covers (an insert never fails for want of one).

- ``partitions_ensure`` makes the current month's partition and the next ones ahead of
  time (retention's periodic run does, and ``manage.py audit_partitions ensure``).
- ``partitions_retire`` is retention's partition pass. Retention removes a task's
  audit events by rows only in months not yet ended (and in the DEFAULT partition);
  events in an ended month wait for their partition, which is dropped whole
  (``audit_partition_drop``, audited as an ``AuditPartitionRemoval``) once no event in
  it belongs to a task still in the database and every task with events there has a
  ``TaskRemoval``. A partition still holding a task that stays (under legal hold, kept
  by its policy, or still running) past ``purge_after`` gets the removed tasks' events
  deleted by rows instead, so that they do not wait forever; the staying task keeps
  the partition.

Both run as the app role through SECURITY DEFINER functions, each statement under a
short ``lock_timeout``: creating or dropping a partition takes a brief ACCESS EXCLUSIVE
lock on ``audit_auditevent``; a run that cannot get it in time leaves the work for the
next run rather than queue every step's insert behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

import structlog
from django.db import DatabaseError, connection, transaction

logger = structlog.get_logger(__name__)

PARENT = "audit_auditevent"
DEFAULT = "audit_auditevent_default"
MONTHS_AHEAD = 3
# How long a partition statement waits for its lock before giving up (this run).
LOCK_TIMEOUT = "2s"
# A month is retired this long after it ended: a step sealed just before midnight may
# commit its events into it a little after.
SETTLE = timedelta(days=1)


@dataclass(frozen=True)
class Partition:
    """One partition: its table name, its range (``None``, ``None`` for the DEFAULT
    one; ``end`` excluded), its estimated rows (``pg_class.reltuples``, -1 never
    analysed) and its bytes (table, TOAST and indexes)."""

    name: str
    start: datetime | None
    end: datetime | None
    rows: int
    bytes: int


def _month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def _next_month(month: datetime) -> datetime:
    return datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)


def _name_month(name: str) -> datetime | None:
    """The month a partition's name covers (``audit_auditevent_p2026_12``), or None."""
    prefix = f"{PARENT}_p"
    if not name.startswith(prefix):
        return None
    year, month = name[len(prefix) :].split("_")
    return datetime(int(year), int(month), 1, tzinfo=UTC)


def partitioned() -> bool:
    """Whether the audit trail is partitioned here (PostgreSQL after ``audit.0011``)."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", [PARENT])
        row = cursor.fetchone()
    return bool(row) and row[0] == "p"


def partitions_list() -> list[Partition]:
    """Every partition of the audit trail, months in order, the DEFAULT one last; []
    where the trail is not partitioned."""
    if not partitioned():
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid)"
            "  FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass",
            [PARENT],
        )
        rows = cursor.fetchall()
    found = []
    for name, tuples, size in rows:
        month = _name_month(name)
        found.append(
            Partition(
                name=name,
                start=month,
                end=_next_month(month) if month else None,
                rows=int(tuples),
                bytes=int(size),
            )
        )
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(found, key=lambda p: (p.start or far, p.name))


def partitions_ensure(
    *, now: datetime, months_ahead: int = MONTHS_AHEAD, since: datetime | None = None
) -> list[str]:
    """Make the month partitions from ``since``'s month (default: ``now``'s) through
    ``months_ahead`` months after ``now``'s, those missing; rows of those months already
    in the DEFAULT partition move into theirs. Returns the names made. Safe to run
    twice and in many processes. Raises ``DatabaseError`` when a lock is not had within
    ``LOCK_TIMEOUT``."""
    if not partitioned():
        return []
    month = _month_start(since or now)
    last = _month_start(now)
    for _ in range(months_ahead):
        last = _next_month(last)
    made = []
    while month <= last:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [LOCK_TIMEOUT])
            # One at a time: two processes making the same month would collide.
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [PARENT])
            cursor.execute("SELECT audit_partition_create(%s)", [month])
            name = cursor.fetchone()[0]
        if name:
            made.append(name)
            logger.info("audit partition made", partition=name)
        month = _next_month(month)
    return made


@dataclass
class RetireReport:
    """What a partition pass did: partitions dropped (name: events), those whose
    removed tasks' events were deleted by rows (name: tasks), those still waiting for
    tasks to leave, and those whose lock was not had in time."""

    dropped: dict[str, int] = field(default_factory=dict)
    purged: dict[str, int] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)


def _range_sql() -> str:
    return "e.created_at >= %s AND e.created_at < %s"


def _holds_present_task(start: datetime, end: datetime) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXISTS (SELECT 1 FROM {PARENT} AS e WHERE {_range_sql()}"  # noqa: S608
            "  AND EXISTS (SELECT 1 FROM agents_agenttask AS t WHERE t.id = e.task_id))",
            [start, end],
        )
        return bool(cursor.fetchone()[0])


def _removed_tasks(start: datetime, end: datetime, limit: int) -> list[UUID]:
    """Up to ``limit`` tasks with events in the range whose row is gone (removed)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT DISTINCT e.task_id FROM {PARENT} AS e WHERE {_range_sql()}"  # noqa: S608
            "  AND NOT EXISTS (SELECT 1 FROM agents_agenttask AS t WHERE t.id = e.task_id)"
            " LIMIT %s",
            [start, end, limit],
        )
        return [row[0] for row in cursor.fetchall()]


def partitions_retire(
    *, now: datetime, actor: str, purge_after: timedelta, batch: int = 20, dry_run: bool = False
) -> RetireReport:
    """One partition pass over the month partitions that have ended, oldest first:
    drop each that holds no event of a task still in the database (audited); in one
    that still does and ended more than ``purge_after`` before ``now``, delete by rows
    the events of up to ``batch`` removed tasks; leave the others. ``dry_run`` only
    reports (a partition it would drop is in ``dropped`` with its estimated rows).
    Safe to run in many processes at once and to kill at any point: each drop and each
    task's row delete is its own transaction."""
    report = RetireReport()
    for part in partitions_list():
        if part.start is None or part.end is None or part.end > now - SETTLE:
            continue
        if not _holds_present_task(part.start, part.end):
            if dry_run:
                report.dropped[part.name] = max(part.rows, 0)
                continue
            try:
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute("SELECT set_config('lock_timeout', %s, true)", [LOCK_TIMEOUT])
                    cursor.execute("SELECT audit_partition_drop(%s, %s)", [part.name, actor])
                    report.dropped[part.name] = int(cursor.fetchone()[0])
            except DatabaseError as exc:
                # A lock not had in time, or a task restored into it meanwhile.
                logger.warning("audit partition not dropped", partition=part.name, error=str(exc))
                report.busy.append(part.name)
                continue
            logger.info(
                "audit partition dropped", partition=part.name, events=report.dropped[part.name]
            )
        elif part.end <= now - purge_after:
            tasks = _removed_tasks(part.start, part.end, batch)
            if tasks and not dry_run:
                for task_id in tasks:
                    with transaction.atomic(), connection.cursor() as cursor:
                        cursor.execute("SELECT audit_events_remove(%s, true)", [task_id])
                logger.info("audit partition purged by rows", partition=part.name, tasks=len(tasks))
            if tasks:
                report.purged[part.name] = len(tasks)
            else:
                report.waiting.append(part.name)
        else:
            report.waiting.append(part.name)
    return report
