"""The audit trail: an append-only, ordered record of everything a task did.

Rows are only ever inserted (``audit.services.AuditBatch``); on PostgreSQL a trigger
refuses UPDATE and DELETE, so not even a bug or an admin can rewrite history, and the
app role has no TRUNCATE. Each event carries a keyed hash of its content chained to the
previous event of its task, so whoever gets past those (the table's owner can disable
the trigger) leaves a break that ``manage.py audit_verify`` finds (``audit.integrity``).
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone


class EventType(models.TextChoices):
    CREATED = "created"
    TRANSITION = "transition"
    REASONING = "reasoning"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    STEP = "step"
    STATE_MIGRATED = "state_migrated"
    SCHEMA_REFUSED = "schema_refused"
    STEP_FAILED = "step_failed"
    WORKER_LOST = "worker_lost"
    DEAD_LETTERED = "dead_lettered"
    REQUEUED = "requeued"
    SUSPENDED = "suspended"
    APPROVAL_DECIDED = "approval_decided"
    SIGNAL_RECEIVED = "signal_received"
    SIGNAL_CONSUMED = "signal_consumed"
    WAIT_ENDED = "wait_ended"
    CANCEL_REQUESTED = "cancel_requested"
    REPLAYED_FROM = "replayed_from"
    REPUBLISHED = "republished"
    BREAKER = "breaker"
    MODEL_CALL = "model_call"
    CHILDREN_STARTED = "children_started"
    CHILD_ENDED = "child_ended"
    LEGAL_HOLD = "legal_hold"
    CHECKPOINTS_REMOVED = "checkpoints_removed"
    RESTORED = "restored"


class DigestField(models.Field):  # type: ignore[type-arg]
    """A SHA-256 digest stored as its 32 bytes (``bytea``), read and written as its
    64-character hex string, which is what the chain code, the API and exports use; ""
    (no digest) is stored as NULL. Half the room of the hex text, and an event's two
    digests were 38% of its row (issue 24)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", True)
        kwargs.setdefault("default", "")
        super().__init__(*args, **kwargs)

    def get_internal_type(self) -> str:
        return "BinaryField"  # bytea on PostgreSQL, BLOB on SQLite

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> str:
        return self.to_python(value)

    def to_python(self, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        return bytes(value).hex()

    def get_prep_value(self, value: Any) -> bytes | None:
        if value is None or value == "":
            return None
        if isinstance(value, str):
            return bytes.fromhex(value)
        return bytes(value)

    def value_to_string(self, obj: Any) -> str:
        return self.to_python(self.value_from_object(obj))


# The events that record an error (a task's "last error" is the latest of them).
ERROR_EVENT_TYPES = (
    EventType.STEP_FAILED,
    EventType.DEAD_LETTERED,
    EventType.SCHEMA_REFUSED,
    EventType.WORKER_LOST,
)


class AuditEvent(models.Model):
    """One event of a task's trail. On PostgreSQL the table is partitioned by month of
    ``created_at`` (migration ``audit.0011``, ``audit.partitions``): its primary key in
    the database is ``(id, created_at)``, ids stay unique (one identity sequence)."""

    # No index of its own: the (task, seq, created_at) unique index serves every lookup
    # by task. No foreign key in the database: a removed task's events wait in their
    # closed month's partition until it is dropped (audit.0011 says what guards instead).
    task = models.ForeignKey(
        "agents.AgentTask",
        on_delete=models.PROTECT,
        related_name="audit_events",
        db_index=False,
        db_constraint=False,
    )
    # 1, 2, 3 ... per task, with no gaps: the order of what happened.
    seq = models.PositiveIntegerField()
    type = models.CharField(max_length=32, choices=EventType.choices)
    step = models.PositiveIntegerField(null=True, blank=True)
    payload = models.JSONField(default=dict)
    # Who caused it: "worker:<host>:<pid>", "user:<name>", "scheduler:<host>:<pid>".
    actor = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    # Tamper evidence (audit.integrity): an HMAC of this event's content and of the
    # previous event's hash (that event's own ``hash``, not stored again here); empty on
    # events written before the chain existed.
    hash = DigestField()

    class Meta:
        ordering = ["task", "seq"]
        constraints = [
            # A partitioned table's unique constraints include its partition key; the
            # task's row lock keeps (task, seq) unique (audit.0011 explains).
            models.UniqueConstraint(
                fields=["task", "seq", "created_at"], name="audit_event_seq_per_task"
            ),
        ]
        indexes = [
            # A task's last error (``agents.diagnosis``): a few entries per failing task.
            models.Index(
                "task",
                models.F("seq").desc(),
                condition=models.Q(type__in=ERROR_EVENT_TYPES),
                name="audit_event_task_errors",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} #{self.seq} {self.type}"


class DeadLetter(models.Model):
    """A task that could not go on by itself, with everything needed to judge and requeue it."""

    class Reason(models.TextChoices):
        RETRIES_EXHAUSTED = "retries_exhausted"
        WORKER_LOST = "worker_lost"
        DELIVERY_LIMIT = "delivery_limit"

    task = models.ForeignKey(
        "agents.AgentTask", on_delete=models.PROTECT, related_name="dead_letters"
    )
    step = models.PositiveIntegerField()
    reason = models.CharField(max_length=32, choices=Reason.choices)
    error = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    # The broker message as it was delivered: task name, arguments, headers.
    message = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)
    requeued_at = models.DateTimeField(null=True, blank=True)
    requeued_by = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["created_at"],
                condition=models.Q(requeued_at__isnull=True),
                name="dead_letter_open",
            ),
        ]

    def __str__(self) -> str:
        return f"dead letter of {self.task_id} at step {self.step} ({self.reason})"


class AuditChainStart(models.Model):
    """Where the hash chain begins, recorded once by migration ``audit.0005``: events
    with an id up to ``unchained_through_id`` were written before the chain existed and
    may lack a hash; any later event without one had it removed (``audit_verify``
    reports it ``unsealed``). The app's database role may only read it (``db_app_role``).
    """

    unchained_through_id = models.BigIntegerField(default=0)
    recorded_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"chain from event id {self.unchained_through_id + 1}"


class TaskRemoval(models.Model):
    """The durable record of a task removed from the hot tables by retention
    (``agents.retention``), written in the transaction that removes it and kept after
    it: which archive holds the task (its storage name and SHA-256), how many rows of
    each kind went, and the head of the task's audit chain, ``(head_seq, head_hash)``.

    Append-only like the audit trail (a trigger refuses UPDATE and DELETE; the app role
    may only SELECT and INSERT), and chained the same way: ``hash`` is the keyed hash
    of its content and of the record before it (``seq`` order), checked by
    ``audit_verify --all`` (``audit.integrity.removals_verify``). A task's audit events
    can be deleted only through ``audit_events_remove(task)`` (migration
    ``audit.0006``), which requires this record and the task row already gone.
    """

    seq = models.PositiveBigIntegerField(unique=True)
    task_id = models.UUIDField(db_index=True)
    owner = models.CharField(max_length=150)
    agent_name = models.CharField(max_length=100)
    status = models.CharField(max_length=20)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The archive: storage name (``AGENTS_RETENTION["storage"]``), SHA-256 of its bytes.
    archive = models.CharField(max_length=500)
    archive_sha256 = models.CharField(max_length=64)
    archive_bytes = models.PositiveBigIntegerField()
    # Rows removed, per model label ({"agents.checkpoint": 11, ...}).
    counts = models.JSONField(default=dict)
    head_seq = models.PositiveIntegerField()
    head_hash = models.CharField(max_length=64, blank=True, default="")
    # The policy that removed it ({"mode": ..., "archive_after_days": ..., "rule": ...}).
    policy = models.JSONField(default=dict)
    actor = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    prev_hash = models.CharField(max_length=64, blank=True, default="")
    hash = models.CharField(max_length=64)

    class Meta:
        ordering = ["seq"]

    def __str__(self) -> str:
        return f"removal #{self.seq} of task {self.task_id}"


class AuditPartitionRemoval(models.Model):
    """A month partition of the audit trail dropped by retention (``audit.partitions``):
    written by ``audit_partition_drop`` (migration ``audit.0011``) in the transaction that
    drops it, once every task with events in it was archived and removed (each has its
    ``TaskRemoval``). Append-only (a trigger refuses UPDATE and DELETE)."""

    name = models.CharField(max_length=63)
    range_start = models.DateTimeField()
    range_end = models.DateTimeField()
    events = models.PositiveBigIntegerField()
    tasks = models.PositiveBigIntegerField()
    actor = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["range_start", "id"]

    def __str__(self) -> str:
        return f"partition {self.name} dropped ({self.events} events of {self.tasks} tasks)"
