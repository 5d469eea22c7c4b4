"""Retention and archival: finished tasks leave the hot tables, archived first.

Policy (``AGENTS_RETENTION``, see settings): per owner (username), per agent, and a
default, merged field by field (owner over agent over default): ``mode`` and
``archive_after_days`` (days since the task finished).

- ``keep``: nothing happens (the default).
- ``keep_latest``: the task is archived, then every checkpoint but its latest is
  removed; the task, its audit trail and everything else stay. The removal is an audit
  event of the task (``checkpoints_removed``, naming the archive).
- ``archive_and_remove``: the task is archived, then it and every row that refers to
  it (checkpoints, audit events, suspensions, signals, dead letters, ledger entries,
  model calls, messages, task-scoped credentials and values) are removed, and a
  ``TaskRemoval`` record (``audit.models``) is written in the same transaction: it
  survives the task, names the archive and its SHA-256, and is itself chained.

Only tasks in a final status (``agents.core.state_machine.FINAL``), not under legal
hold, and that no live task was replayed from, are candidates. For each one a run:

1. writes the archive (``audit.archive``: gzip JSON lines) from one REPEATABLE READ
   snapshot to the storage ``STORAGES["retention"]``, under a name fixed by the task
   and its event count (``tasks/YYYY/MM/DD/<id>.<audit_seq>.jsonl.gz``), so a second
   run writes the same bytes to the same name;
2. reads it back from the storage and verifies it (``audit.archive.archive_verify``),
   and checks its rows per kind against the database;
3. in one short transaction, locks the task row (``SKIP LOCKED``: a row someone holds
   is left for the next run), checks again that it is final, not held and has the
   archived event count, and removes or prunes it. The removal of audit events goes
   through ``audit_events_remove`` (migration ``audit.0006``), which refuses unless the
   removal record exists and the task row is gone; a trigger refuses to delete a task
   row that is held or not final (``agents.0010``).

On the partitioned trail (``audit.partitions``), ``audit_events_remove`` deletes only a
removed task's events in months not yet ended; those of ended months wait for their
partition, which the run drops whole once every task in it is removed (audited by an
``AuditPartitionRemoval``), or deletes by rows after ``partition_purge_after``.

A run killed anywhere loses nothing: before step 3 commits, the task is whole in the
database (the next run archives it again, to the same name); after, the archive was
already verified. Live tasks are never read for update, so no step waits on retention.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import reduce
from operator import or_
from typing import IO, Any
from uuid import UUID

import structlog
from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.files import File
from django.core.files.storage import Storage, storages
from django.db import DatabaseError, connection, models, transaction
from django.db.models import Exists, OuterRef, Q, QuerySet

from agents import metrics, permissions
from agents.core import clock, faults
from agents.core.state_machine import FINAL
from agents.models import AgentTask, Checkpoint
from agents.selectors import parse_task_id
from agents_project.errors import ApplicationError, Conflict, InvalidInput, NotFound
from audit.archive import END, EVENT, TASK, ArchiveWriter, archive_records, archive_verify
from audit.integrity import removal_hash
from audit.models import AuditEvent, EventType, TaskRemoval
from audit.partitions import RetireReport, partitioned, partitions_ensure, partitions_retire
from audit.services import AuditBatch, process_actor, user_actor

logger = structlog.get_logger(__name__)

KEEP = "keep"
KEEP_LATEST = "keep_latest"
ARCHIVE_AND_REMOVE = "archive_and_remove"
DEFAULT_POLICY = {"mode": KEEP, "archive_after_days": 90}
# Removed with their task but never written to an archive: secrets (encrypted or not).
NOT_ARCHIVED = frozenset({"tools.credential"})
# Serialises appends to the chain of removal records (pg_advisory_xact_lock's key).
_REMOVAL_CHAIN_LOCK = 0x52_45_54_4E  # "RETN"


class ArchiveMismatch(ApplicationError):
    """The archive read back from the storage is not what the database holds."""


# --- Policy -------------------------------------------------------------------------------


def _config() -> dict[str, Any]:
    return settings.AGENTS["RETENTION"]


def policy_for(*, owner: str, agent: str) -> dict[str, Any]:
    """The effective policy of a task of ``owner`` (username) and ``agent``: the default,
    then the agent's, then the owner's fields (``AGENTS_RETENTION``)."""
    config = _config()
    return {
        **DEFAULT_POLICY,
        **config.get("default", {}),
        **config.get("agents", {}).get(agent, {}),
        **config.get("owners", {}).get(owner, {}),
    }


def _policy_groups(now: datetime) -> list[tuple[Q, dict[str, Any]]]:
    """The task filters of every distinct (owner, agent) combination the settings name,
    each with its effective policy: a named owner with a named agent, a named owner with
    any other agent, ... and any other owner with any other agent."""
    config = _config()
    owners = sorted(config.get("owners", {}))
    agents = sorted(config.get("agents", {}))
    groups = []
    for owner in [*owners, None]:
        for agent in [*agents, None]:
            where = Q(owner__username=owner) if owner else ~Q(owner__username__in=owners)
            where &= Q(agent_name=agent) if agent else ~Q(agent_name__in=agents)
            policy = policy_for(owner=owner or "", agent=agent or "")
            policy["rule"] = f"owner={owner or '*'} agent={agent or '*'}"
            cutoff = now - timedelta(days=float(policy["archive_after_days"]))
            groups.append((where & Q(finished_at__lt=cutoff), policy))
    return groups


def candidates(*, now: datetime | None = None) -> QuerySet[AgentTask]:
    """Tasks some policy archives now: final, not held, finished before their policy's
    cutoff, not the origin of a live replay; for ``keep_latest`` only those with more
    than one checkpoint left. Oldest finished first."""
    now = now or clock.now()
    chosen = [
        where & (Q(prunable=True) if policy["mode"] == KEEP_LATEST else Q())
        for where, policy in _policy_groups(now)
        if policy["mode"] != KEEP
    ]
    if not chosen:
        return AgentTask.objects.none()
    live_replay = AgentTask.objects.filter(replayed_from=OuterRef("pk")).exclude(status__in=FINAL)
    older_checkpoint = Checkpoint.objects.filter(
        task=OuterRef("pk"), step__lt=OuterRef("current_step") - 1
    )
    return (
        AgentTask.objects.filter(status__in=FINAL, legal_hold=False)
        .annotate(prunable=Exists(older_checkpoint))
        .filter(reduce(or_, chosen))
        .exclude(Exists(live_replay))
        .order_by("finished_at", "id")
    )


# --- The archive --------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveInfo:
    """An archive as written and verified: storage name, SHA-256 and size of its bytes,
    rows per model label, the task's event count and the last event's hash."""

    name: str
    sha256: str
    size: int
    counts: dict[str, int]
    audit_seq: int
    head_hash: str


def _relations() -> list[tuple[type[models.Model], str]]:
    """Every model with a foreign key to a task (its attribute name), but replays: the
    rows removed with a task, found from the models themselves so that a new table
    that refers to tasks is archived and removed too."""
    found = []
    for rel in AgentTask._meta.related_objects:
        model = rel.related_model
        if model is AgentTask or rel.many_to_many or not isinstance(model, type):
            continue
        found.append((model, rel.field.attname))
    return sorted(found, key=lambda item: item[0]._meta.label_lower)


def _rows(model: type[models.Model], column: str, task_id: UUID) -> Iterator[dict[str, Any]]:
    names = [f.attname for f in model._meta.concrete_fields]
    order = ("seq", "id") if model is AuditEvent else ("pk",)
    rows = model._base_manager.filter(**{column: task_id}).order_by(*order).values(*names)
    return rows.iterator(chunk_size=5000)


def archive_name(task: AgentTask) -> str:
    """Where a task's archive goes in the storage: fixed by the task and its event count."""
    day = (task.finished_at or task.created_at).strftime("%Y/%m/%d")
    return f"tasks/{day}/{task.pk}.{task.audit_seq}.jsonl.gz"


def _write(task_id: UUID, out: IO[bytes]) -> tuple[AgentTask, ArchiveWriter]:
    """Write the task's archive to ``out`` from one consistent snapshot of the database."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        task = AgentTask.objects.select_related("owner").get(pk=task_id)
        writer = ArchiveWriter(out, task_id=task.pk)
        fields = {f.attname: getattr(task, f.attname) for f in AgentTask._meta.concrete_fields}
        writer.write(TASK, {**fields, "owner": task.owner.get_username()})
        for model, column in _relations():
            label = model._meta.label_lower
            if label in NOT_ARCHIVED:
                continue
            for row in _rows(model, column, task.pk):
                writer.write(label, row)
        writer.close()
    return task, writer


def _digest(source: IO[bytes]) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    while chunk := source.read(1 << 20):
        sha.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), size


def task_archive_write(*, task_id: UUID, storage: Storage | None = None) -> ArchiveInfo:
    """Archive one task to ``storage`` (default ``STORAGES["retention"]``), read it back
    and verify it. Idempotent: the same task gives the same bytes under the same name,
    and an existing file with those bytes is left as it is. Raises ``ArchiveMismatch``
    when what the storage returns does not verify."""
    storage = storage or storages["retention"]
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
        task, writer = _write(task_id, spool)
        name = archive_name(task)
        spool.seek(0)
        sha, size = _digest(spool)
        existing = None
        if storage.exists(name):
            with storage.open(name, "rb") as stored:
                existing = _digest(stored)[0]
        if existing != sha:
            if existing is not None:
                storage.delete(name)
            spool.seek(0)
            saved = storage.save(name, File(spool, name=name))
            if saved != name:
                storage.delete(saved)
                raise ArchiveMismatch(f"storage saved {name} as {saved}: allow overwrites")
    with storage.open(name, "rb") as stored:
        report = archive_verify(stored)
    with storage.open(name, "rb") as stored:
        stored_sha, stored_size = _digest(stored)
    if report.breaks or report.counts != writer.counts:
        raise ArchiveMismatch(
            f"archive {name} of task {task_id} does not verify: "
            + "; ".join(str(b) for b in report.breaks[:3])
        )
    if stored_sha != sha:
        raise ArchiveMismatch(f"archive {name} of task {task_id}: the stored bytes differ")
    return ArchiveInfo(
        name=name,
        sha256=stored_sha,
        size=stored_size,
        counts=dict(writer.counts),
        audit_seq=task.audit_seq,
        head_hash=str(writer.head[1]),
    )


# --- Removal ------------------------------------------------------------------------------


def _counts_now(task_id: UUID) -> dict[str, int]:
    counts = {TASK: 1}
    for model, column in _relations():
        n = model._base_manager.filter(**{column: task_id}).count()
        if n and model._meta.label_lower not in NOT_ARCHIVED:
            counts[model._meta.label_lower] = n
    return counts


def _locked(task_id: UUID, audit_seq: int) -> AgentTask | None:
    """The task, locked, if it is still what was archived: final, not held, the same
    event count, no live replay of it. ``None`` when someone holds its row."""
    live_replay = AgentTask.objects.filter(replayed_from=OuterRef("pk")).exclude(status__in=FINAL)
    return (
        AgentTask.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("owner")
        .filter(pk=task_id, status__in=FINAL, legal_hold=False, audit_seq=audit_seq)
        .exclude(Exists(live_replay))
        .first()
    )


def _removal_record(
    task: AgentTask, info: ArchiveInfo, policy: dict[str, Any], actor: str
) -> TaskRemoval:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_REMOVAL_CHAIN_LOCK])
    last = TaskRemoval.objects.order_by("-seq").values_list("seq", "hash").first()
    seq, prev_hash = (last[0] + 1, last[1]) if last else (1, "")
    record = TaskRemoval(
        seq=seq,
        task_id=task.pk,
        owner=task.owner.get_username(),
        agent_name=task.agent_name,
        status=task.status,
        finished_at=task.finished_at,
        archive=info.name,
        archive_sha256=info.sha256,
        archive_bytes=info.size,
        counts=info.counts,
        head_seq=info.audit_seq,
        head_hash=info.head_hash,
        policy=policy,
        actor=actor,
        created_at=clock.now(),
        prev_hash=prev_hash,
    )
    record.hash = removal_hash(record, key=None)
    record.save(force_insert=True)
    return record


def _column(model: type[models.Model], attname: str) -> str:
    """The database column of a model's field, by its attribute name."""
    return next(str(f.column) for f in model._meta.concrete_fields if f.attname == attname)


def _remove(task: AgentTask, info: ArchiveInfo, policy: dict[str, Any], actor: str) -> None:
    """Delete the task and every row referring to it; the caller's transaction holds
    the task's lock. The removal record first: ``audit_events_remove`` requires it."""
    _removal_record(task, info, policy, actor)
    # Finished replays of it keep their replayed_from_step; the link itself goes.
    AgentTask.objects.filter(replayed_from=task.pk).update(replayed_from=None)
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        for model, column in _relations():
            if model is AuditEvent:
                continue
            cursor.execute(
                f"DELETE FROM {quote(model._meta.db_table)} "  # noqa: S608 - names from models
                f"WHERE {quote(_column(model, column))} = %s",
                [task.pk],
            )
        cursor.execute(f"DELETE FROM {quote(AgentTask._meta.db_table)} WHERE id = %s", [task.pk])
        cursor.execute("SELECT audit_events_remove(%s)", [task.pk])
        removed = cursor.fetchone()[0]
    if removed != info.counts.get(EVENT, 0):
        raise ArchiveMismatch(
            f"task {task.pk}: {removed} audit events removed, {info.counts.get(EVENT, 0)} archived"
        )


def _prune(task: AgentTask, info: ArchiveInfo, actor: str) -> int:
    """Remove every checkpoint of the task but its latest, and audit it."""
    latest = Checkpoint.objects.filter(task=task).order_by("-step").values_list("step", flat=True)
    keep = latest.first()
    removed, _ = Checkpoint.objects.filter(task=task, step__lt=keep).delete()
    audit = AuditBatch(task, actor=actor)
    audit.add(
        EventType.CHECKPOINTS_REMOVED,
        {"removed": removed, "kept_step": keep, "archive": info.name, "sha256": info.sha256},
    )
    audit.flush()
    task.save(update_fields=["audit_seq"])
    return int(removed)


@dataclass
class RunReport:
    """What a retention run did: task ids per outcome."""

    removed: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    would: list[tuple[str, str]] = field(default_factory=list)
    # The audit trail's partitions: made ahead, and the pass over ended months.
    partitions_made: list[str] = field(default_factory=list)
    partitions: RetireReport = field(default_factory=RetireReport)


def partition_purge_after() -> timedelta:
    """How long after its month ended a partition that still holds a staying task gets
    its removed tasks' events deleted by rows (``audit.partitions.partitions_retire``):
    ``AGENTS_RETENTION["partition_purge_after_days"]``, by default the longest
    ``archive_after_days`` of an ``archive_and_remove`` policy plus 31 days, by when
    every task of that month that retention removes has become due."""
    config = _config()
    if "partition_purge_after_days" in config:
        return timedelta(days=float(config["partition_purge_after_days"]))
    policies: list[dict[str, Any]] = [
        {**DEFAULT_POLICY, **config.get("default", {}), **rule}
        for scope in ("agents", "owners")
        for rule in config.get(scope, {}).values()
    ] + [{**DEFAULT_POLICY, **config.get("default", {})}]
    days = [float(p["archive_after_days"]) for p in policies if p["mode"] == ARCHIVE_AND_REMOVE]
    return timedelta(days=max(days, default=90.0) + 31)


def _partitions_maintain(report: RunReport, *, actor: str, batch: int, dry_run: bool) -> None:
    """Partitions made ahead, then the pass over ended months; errors logged, not
    raised (the next run tries again), as the tasks' work is already done."""
    now = clock.now()
    try:
        if not dry_run:
            report.partitions_made = partitions_ensure(now=now)
        report.partitions = partitions_retire(
            now=now,
            actor=actor,
            purge_after=partition_purge_after(),
            batch=batch,
            dry_run=dry_run,
        )
    except DatabaseError:
        logger.exception("retention: audit partitions not maintained")


def retention_run(
    *,
    batch: int | None = None,
    dry_run: bool = False,
    storage: Storage | None = None,
    actor: str | None = None,
) -> RunReport:
    """One pass: archive and remove (or prune) up to ``batch`` candidate tasks
    (``AGENTS_RETENTION["batch"]``), one transaction per task; then, on a partitioned
    trail, make the coming months' partitions and drop the ended months whose tasks
    are all removed (``audit.partitions``). Safe to run in many
    processes at once and to kill at any point (see the module's docstring).
    ``dry_run`` lists what it would do ((task id, mode) in ``would``) and writes nothing.
    Raises ``ImproperlyConfigured`` on a database other than PostgreSQL."""
    batch = int(_config().get("batch", 20) if batch is None else batch)
    actor = actor or process_actor("retention")
    report = RunReport()
    chosen = (
        candidates()
        .select_related("owner")
        .only("id", "agent_name", "owner__username", "audit_seq")[:batch]
    )
    tasks = list(chosen)
    if tasks and not dry_run and connection.vendor != "postgresql":
        # The removal path is PostgreSQL's (triggers, audit_events_remove, advisory locks).
        raise ImproperlyConfigured("retention removes tasks on PostgreSQL only")
    for task in tasks:
        policy = policy_for(owner=task.owner.get_username(), agent=task.agent_name)
        if dry_run:
            report.would.append((str(task.pk), policy["mode"]))
            continue
        try:
            outcome = task_retain(task_id=task.pk, policy=policy, storage=storage, actor=actor)
        except ArchiveMismatch:
            logger.exception("retention: archive did not verify", task_id=str(task.pk))
            report.failed.append(str(task.pk))
            continue
        getattr(report, outcome).append(str(task.pk))
    if partitioned():
        _partitions_maintain(report, actor=actor, batch=batch, dry_run=dry_run)
    for outcome in ("removed", "pruned", "skipped", "failed"):
        metrics.retention_counted(outcome=outcome, count=len(getattr(report, outcome)))
    if report.removed or report.pruned or report.failed or report.partitions.dropped:
        logger.info(
            "retention run",
            removed=len(report.removed),
            pruned=len(report.pruned),
            skipped=len(report.skipped),
            failed=len(report.failed),
            partitions_dropped=sorted(report.partitions.dropped),
        )
    return report


def task_retain(
    *, task_id: UUID, policy: dict[str, Any], storage: Storage | None = None, actor: str
) -> str:
    """Archive one task and apply ``policy``'s mode to it. Returns ``removed``,
    ``pruned`` or ``skipped`` (it changed, was held, or its row is locked: the next run
    tries again)."""
    info = task_archive_write(task_id=task_id, storage=storage)
    faults.fault_point("retention_archived", step=0)
    with transaction.atomic():
        task = _locked(task_id, info.audit_seq)
        if task is None or _counts_now(task_id) != info.counts:
            return "skipped"
        if policy["mode"] == KEEP_LATEST:
            _prune(task, info, actor)
            outcome = "pruned"
        else:
            _remove(task, info, policy, actor)
            outcome = "removed"
        faults.fault_point("retention_before_commit", step=0)
    logger.info("task retained", task_id=str(task_id), outcome=outcome, archive=info.name)
    return outcome


# --- Legal hold ---------------------------------------------------------------------------


def task_legal_hold_set(
    *, task_id: UUID | str, held: bool, reason: str = "", user: Any = None
) -> AgentTask:
    """Put a task under legal hold (``held``) or release it, with an audit event
    ``legal_hold`` (``held``, ``reason``) in the same transaction. ``user`` (``None``:
    the system, a command) needs ``agents.hold_agenttask``. Raises ``Forbidden``,
    ``NotFound``."""
    permissions.task_hold_check(user)
    with transaction.atomic():
        task = AgentTask.objects.select_for_update().filter(pk=parse_task_id(task_id)).first()
        if task is None:
            raise NotFound(f"no task {task_id}")
        actor = user_actor(user) if user is not None else process_actor("command")
        audit = AuditBatch(task, actor=actor)
        audit.add(EventType.LEGAL_HOLD, {"held": held, "reason": reason})
        audit.flush()
        task.legal_hold = held
        task.save(update_fields=["legal_hold", "audit_seq"])
    return task


# --- Restore ------------------------------------------------------------------------------


def task_restore(*, source: IO[bytes], archive: str, actor: str) -> AgentTask:
    """Put an archived task back into the hot tables for an investigation, every row as
    it was (same ids, same hash chain), under legal hold so that retention leaves it;
    a ``restored`` audit event (``archive``, ``sha256`` of the file) continues its
    chain. All or nothing, in one transaction. Raises ``InvalidInput`` (the archive does
    not verify, or its owner no longer exists) or ``Conflict`` (the task is there)."""
    report = archive_verify(source)
    if report.breaks:
        raise InvalidInput(f"the archive does not verify: {report.breaks[0]}", field="archive")
    source.seek(0)
    sha, _ = _digest(source)
    source.seek(0)
    task_id = parse_task_id(report.task_id)
    with transaction.atomic():
        if AgentTask.objects.filter(pk=task_id).exists():
            raise Conflict(f"task {task_id} is in the database already")
        if (
            connection.vendor == "postgresql"
            and TaskRemoval.objects.filter(task_id=task_id).exists()
        ):
            # Its events may still wait in an ended month's partition: the archive's
            # copy replaces them.
            with connection.cursor() as cursor:
                cursor.execute("SELECT audit_events_remove(%s, true)", [task_id])
        owner_id = report.task.get("owner_id")
        owner = get_user_model()._default_manager.filter(pk=int(owner_id or 0)).first()
        if owner is None:
            raise InvalidInput(
                f"its owner {report.task.get('owner')!r} (id {report.task.get('owner_id')}) "
                "no longer exists: create the user first",
                field="owner",
            )
        rows: dict[str, list[models.Model]] = {}
        for record in archive_records(source):
            label = str(record.get("record"))
            if label in ("archive", END):
                continue
            model = apps.get_model(label)
            fields = record["fields"]
            rows.setdefault(label, []).append(
                model(
                    **{
                        f.attname: f.to_python(fields[f.attname])
                        for f in model._meta.concrete_fields
                        if f.attname in fields
                    }
                )
            )
        for label, objects in rows.items():
            apps.get_model(label)._base_manager.bulk_create(objects, batch_size=2000)
        task = AgentTask.objects.select_for_update().get(pk=task_id)
        audit = AuditBatch(task, actor=actor)
        audit.add(EventType.RESTORED, {"archive": archive, "sha256": sha, "legal_hold": True})
        audit.flush()
        task.legal_hold = True
        task.save(update_fields=["legal_hold", "audit_seq"])
    return task


# --- Scheduled runs -----------------------------------------------------------------------


class RetentionLoop:
    """Runs ``retention_run`` every ``AGENTS_RETENTION["interval"]`` seconds (jittered)
    in a thread of the worker's main process, apart from the scheduler's clock, so
    that archiving a long task never delays a timer or a sweep."""

    def __init__(self, *, interval: float | None = None) -> None:
        self.interval = float(_config().get("interval", 3600) if interval is None else interval)
        self.actor = process_actor("retention")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agents-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval * random.uniform(0.5, 1.5)):
            try:
                retention_run(actor=self.actor)
            except Exception:
                # The database or the storage may be away: try again next time.
                logger.exception("retention run failed")
            finally:
                connection.close()
