"""What the runtime knows about agent sessions. The database is the truth.

``status`` is written only by ``agents.core.state_machine.transition``; everything else here
is plain fields and constraints.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from uuid6 import uuid7

from agents_project.tracing import trace_id_of
from audit.models import DigestField


class TaskStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUSPENDED = "suspended"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"


# Statuses in which a task may still make progress (and so can time out).
ACTIVE_STATUSES = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.SUSPENDED)


class AgentTask(models.Model):
    """One agent session: its input, where it is, and how it ended."""

    # UUIDv7 (RFC 9562): time-ordered, so the many indexes that start with a task's id
    # (its events', checkpoints', messages') grow at their right edge, full pages, instead
    # of splitting pages at random (a third of their size at 10^5 tasks; issue 24).
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    # No index of its own: (owner, created_at) serves every lookup by owner.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="agent_tasks",
        db_index=False,
    )
    agent_name = models.CharField(max_length=100)
    agent_version = models.CharField(max_length=50)
    input = models.JSONField()
    status = models.CharField(max_length=20, choices=TaskStatus.choices, default=TaskStatus.PENDING)
    # The next step to run; checkpoints 0 .. current_step - 1 exist.
    current_step = models.PositiveIntegerField(default=1)
    # Schema version of the state in the latest checkpoint.
    state_version = models.PositiveIntegerField()
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    deadline = models.DateTimeField(null=True, blank=True)
    # NULL, not "": the per-owner unique constraint only applies to tasks that have one.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    # Failed attempts of the current step, and times its worker died under it.
    attempt = models.PositiveIntegerField(default=0)
    # When a failed step is due to run again (a database timer, never a broker-side
    # delay: a long backoff holds no worker and survives any restart).
    retry_at = models.DateTimeField(null=True, blank=True)
    worker_losses = models.PositiveIntegerField(default=0)
    # The lease on the current step (``agents.core.leases``): who runs it, until when
    # (the database's clock; renewed by a heartbeat while the step runs), and the
    # fencing token of the latest holder, which every write of a step's result checks.
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    fence = models.PositiveBigIntegerField(default=0)
    # Messages for the current step that can still be delivered (published and not yet
    # consumed, or held by the lease's holder, which RabbitMQ redelivers if it dies).
    # The stuck-task sweep publishes a step at once when this is 0 and no lease is live;
    # with a message counted, only once its lease (or publish) is AGENTS_SWEEP_GRACE old.
    in_flight = models.IntegerField(default=0)
    # The fence of the lease the sweep last took for vanished and published the step
    # again for: one such publish per lease (``agents.core.scheduler``).
    swept_fence = models.PositiveBigIntegerField(null=True, blank=True)
    # Set when a worker refused the step (its agent unknown here, or the checkpoint
    # newer than its code): only a worker whose agent has at least this state version
    # takes the step again, so refusals do not loop.
    needs_state_version = models.PositiveIntegerField(null=True, blank=True)
    # Fair sharing (``agents.core.admission``): the task is ``pending`` and waits for its
    # owner's (or its agent's per-owner) limit of tasks running at once; it has no
    # broker message, and nothing publishes its step until admission clears this flag.
    queued_for_admission = models.BooleanField(default=False)
    # Sequence number of the last audit event written for this task.
    audit_seq = models.PositiveIntegerField(default=0)
    # The chain head as the step engine's hot path last wrote it (``agents.core.commit``):
    # the hash of event ``audit_head_seq``. Valid only while ``audit_head_seq`` equals
    # ``audit_seq`` (other writers append without updating it); a step's claim then
    # reads the head here instead of in the monthly-partitioned trail, which has no
    # partition key to look it up by (``agents_step_before``, migration 0016).
    audit_head_seq = models.PositiveIntegerField(null=True, blank=True)
    audit_head_hash = DigestField()
    replayed_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replays"
    )
    replayed_from_step = models.PositiveIntegerField(null=True, blank=True)
    # Child tasks (``agents.core.children``): the task whose step started this one, that
    # step's number and this child's place among the children it started. A child's id
    # is derived from these three, and they are unique together, so a step that runs
    # again can never start a child twice.
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    spawn_step = models.PositiveIntegerField(null=True, blank=True)
    spawn_index = models.PositiveIntegerField(null=True, blank=True)
    # How many children this task has started (0: none; its ending looks for none).
    spawned = models.PositiveIntegerField(default=0)
    # The schedule that started this task, and the slot (an aware time) it fired for
    # (``agents.schedules``); both NULL for a task started any other way.
    schedule = models.ForeignKey(
        "Schedule",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="tasks",
        db_index=False,  # the partial index below: most tasks have no schedule
    )
    schedule_slot = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Last progress of any kind; the stuck-task sweep looks at it.
    updated_at = models.DateTimeField(default=timezone.now)
    status_changed_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The W3C ``traceparent`` of the span that created the task (``agents_project.tracing``):
    # a step whose message carries no context of this trace (fired by the scheduler, after
    # a restart, or resumed by another request) joins the task's trace through it. Empty
    # when tracing was off at creation.
    trace_context = models.CharField(max_length=64, blank=True, default="")
    # Legal hold (``agents.retention``): retention never archives away or removes a held
    # task, and a trigger (migration 0014) refuses to delete its row. Set and cleared
    # by ``retention_hold_set``, audited as ``legal_hold`` events.
    legal_hold = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at"]
        # Placing and releasing a legal hold is not an owner's right: it takes this.
        permissions = [("hold_agenttask", "Can place and release a legal hold on a task")]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="agent_task_idempotency_key_per_owner",
            ),
            models.UniqueConstraint(
                fields=["parent", "spawn_step", "spawn_index"],
                condition=Q(parent__isnull=False),
                name="agent_task_child_once",
            ),
        ]
        # No index holds a column that every step changes (updated_at, current_step,
        # the lease's), so a step's updates of the row are HOT updates in PostgreSQL
        # (no index entries written; its manual, "Heap-Only Tuples"). Migration 0007
        # also leaves room on the table's pages for them (fillfactor).
        indexes = [
            models.Index(fields=["status", "status_changed_at"], name="agent_task_status_changed"),
            models.Index(fields=["owner", "-created_at"], name="agent_task_owner_created"),
            # The lists' order (the admin's, the API's for an operator), and with the
            # filters an operator narrows them by: one indexed range per page, however
            # deep (keyset pages, ``agents.admin``). The error search has trigram
            # indexes (migration 0010, PostgreSQL only).
            models.Index(fields=["-created_at", "-id"], name="agent_task_created"),
            models.Index(fields=["status", "-created_at", "-id"], name="agent_task_status_created"),
            models.Index(
                fields=["agent_name", "-created_at", "-id"], name="agent_task_agent_created"
            ),
            models.Index(
                fields=["created_at"],
                condition=Q(
                    status__in=("pending", "running"),
                    in_flight__lte=0,
                    queued_for_admission=False,
                ),
                name="agent_task_sweepable",
            ),
            # The admission queue: per owner, oldest first.
            models.Index(
                fields=["owner", "created_at"],
                condition=Q(queued_for_admission=True, status="pending"),
                name="agent_task_admission_queue",
            ),
            # What counts against an owner's limit (``agents.core.admission``).
            models.Index(
                fields=["owner", "agent_name"],
                condition=Q(status__in=("pending", "running"), queued_for_admission=False),
                name="agent_task_owner_admitted",
            ),
            models.Index(
                fields=["retry_at"],
                condition=Q(retry_at__isnull=False),
                name="agent_task_retry_at",
            ),
            # Live children, for the scheduler's ``orphans_cancel``.
            models.Index(
                fields=["parent"],
                condition=Q(
                    parent__isnull=False,
                    status__in=("pending", "running", "suspended", "dead_lettered"),
                ),
                name="agent_task_live_children",
            ),
            # A schedule's tasks (its overlap policy looks for the active ones).
            models.Index(
                fields=["schedule", "status"],
                condition=Q(schedule__isnull=False),
                name="agent_task_scheduled",
            ),
            models.Index(
                fields=["deadline"],
                condition=Q(deadline__isnull=False, status__in=ACTIVE_STATUSES),
                name="agent_task_active_deadline",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.agent_name} {self.id} ({self.status})"

    @property
    def trace_id(self) -> str:
        """The task's trace id (32 hex digits), "" when it was created untraced."""
        return trace_id_of(self.trace_context)


class Checkpoint(models.Model):
    """The state after a step (step 0 is the initial state); written once, never changed."""

    # No index of its own: the (task, step) unique index serves every lookup by task.
    task = models.ForeignKey(
        AgentTask, on_delete=models.CASCADE, related_name="checkpoints", db_index=False
    )
    step = models.PositiveIntegerField()
    state = models.JSONField()
    # What the next step sees of this one: tool results, or how a suspension ended.
    observations = models.JSONField(default=dict)
    schema_version = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["task", "step"]
        constraints = [
            models.UniqueConstraint(fields=["task", "step"], name="checkpoint_one_per_step"),
        ]

    def __str__(self) -> str:
        return f"checkpoint {self.step} of {self.task_id}"


class Suspension(models.Model):
    """Why a suspended task waits (a person, an event, a time) and how the wait ended."""

    class Kind(models.TextChoices):
        APPROVAL = "approval"
        EVENT = "event"
        TIMER = "timer"
        CHILDREN = "children"

    class Resolution(models.TextChoices):
        APPROVED = "approved"
        # A tool call approved with arguments the person changed (``tool_args``: the
        # original; ``payload["args"]``: what runs).
        EDITED = "edited"
        # A tool call the person answered instead (``payload["message"]``): it never runs.
        RESPONDED = "responded"
        REJECTED = "rejected"
        SIGNALLED = "signalled"
        WOKEN = "woken"
        TIMED_OUT = "timed_out"
        CANCELLED = "cancelled"
        JOINED = "joined"
        CHILD_FAILED = "child_failed"

    task = models.ForeignKey(
        AgentTask, on_delete=models.CASCADE, related_name="suspensions", db_index=False
    )
    step = models.PositiveIntegerField()
    kind = models.CharField(max_length=20, choices=Kind.choices)
    # The approval's question, or the event's name.
    reason = models.TextField(blank=True, default="")
    event_name = models.CharField(max_length=200, blank=True, default="")
    # When a timer wakes the task, or when a wait stops waiting (then on_timeout applies).
    wake_at = models.DateTimeField(null=True, blank=True)
    on_timeout = models.CharField(max_length=20, blank=True, default="")
    on_reject = models.CharField(max_length=20, blank=True, default="fail")
    timeout_default = models.JSONField(null=True, blank=True)
    # The tool call an approval is about (``Suspend.tool_call``), when it is one: a
    # person may then edit its arguments or answer it instead (``agents.approvals``).
    tool_name = models.CharField(max_length=200, blank=True, default="")
    tool_args = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.CharField(max_length=20, choices=Resolution.choices, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    comment = models.TextField(blank=True, default="")
    payload = models.JSONField(null=True, blank=True)
    # A wait on children (kind ``children``): how many of them must complete ("all" is
    # their number, "any" is 1), of how many started.
    join_count = models.PositiveIntegerField(null=True, blank=True)
    children_count = models.PositiveIntegerField(null=True, blank=True)
    # "fail": a child that ends without completing fails the join once it cannot hold;
    # "report": it counts as ended, its status and error in the payload.
    on_child_failure = models.CharField(max_length=10, blank=True, default="")

    class Meta:
        ordering = ["task", "step"]
        constraints = [
            models.UniqueConstraint(fields=["task", "step"], name="suspension_one_per_step"),
        ]
        indexes = [
            models.Index(
                fields=["wake_at"],
                condition=Q(resolved_at__isnull=True, wake_at__isnull=False),
                name="suspension_open_wake_at",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} wait at step {self.step} of {self.task_id}"


class Signal(models.Model):
    """A named event sent to a task; kept until a wait for that name consumes it."""

    task = models.ForeignKey(AgentTask, on_delete=models.CASCADE, related_name="signals")
    name = models.CharField(max_length=200)
    payload = models.JSONField(null=True, blank=True)
    sent_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now)
    consumed_at = models.DateTimeField(null=True, blank=True)
    consumed_at_step = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["task", "created_at", "id"]
        indexes = [
            models.Index(
                fields=["task", "name", "created_at"],
                condition=Q(consumed_at__isnull=True),
                name="signal_unconsumed",
            ),
        ]

    def __str__(self) -> str:
        return f"signal {self.name} for {self.task_id}"


class LearnedLimit(models.Model):
    """Time limits computed from an agent's observed durations (``suggest_timeouts
    --apply``); used by agents that opt in with ``learned_limits = True``."""

    agent_name = models.CharField(max_length=100, unique=True)
    step_time_limit = models.FloatField()
    task_timeout = models.FloatField(null=True, blank=True)
    step_samples = models.PositiveIntegerField()
    task_samples = models.PositiveIntegerField()
    computed_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.agent_name}: step {self.step_time_limit:g} s"


# --- Version-pinned runs (``agents.core.versions``) -----------------------------------------
#
# - ``WorkerVersion``: one row per worker process and agent it serves, written by the
#   worker's scheduler every few seconds: a worker is live while its ``last_seen`` is
#   recent (``AGENTS_WORKER_TTL``).
# - ``VersionHold``: a version of an agent that takes no new tasks (a rollback); its
#   running tasks carry on, on workers that serve it.


class WorkerVersion(models.Model):
    # ``worker:<host>:<pid>`` of the worker's main process.
    worker = models.CharField(max_length=300)
    agent = models.CharField(max_length=200)
    version = models.CharField(max_length=50)
    state_version = models.PositiveIntegerField(default=1)
    # The older versions this worker's code declares compatible (``Agent``).
    compatible = models.JSONField(default=list)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        # Made by the rollout app's first migration, whose state moved here (agents.0008).
        db_table = "rollout_workerversion"
        constraints = [
            models.UniqueConstraint(fields=["worker", "agent"], name="worker_version_once"),
        ]
        indexes = [models.Index(fields=["agent", "last_seen"], name="worker_version_live")]

    def __str__(self) -> str:
        return f"{self.worker} serves {self.agent} {self.version}"


class VersionHold(models.Model):
    agent = models.CharField(max_length=200)
    version = models.CharField(max_length=50)
    reason = models.TextField(blank=True, default="")
    created_by = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "rollout_versionhold"
        constraints = [
            models.UniqueConstraint(fields=["agent", "version"], name="version_hold_once"),
        ]

    def __str__(self) -> str:
        return f"{self.agent} {self.version} takes no new tasks"


# --- Schedules (``agents.schedules``) ------------------------------------------------------

# ``Schedule.timezone`` (the field) hides the module inside the class body.
_now = timezone.now


class Schedule(models.Model):
    """Start a task of ``agent_name`` with ``input`` at every slot of a cron expression
    (in ``timezone``) or every ``interval_seconds`` (counted from the Unix epoch), as
    ``owner``."""

    class Overlap(models.TextChoices):
        SKIP = "skip"  # a slot whose previous task still runs starts nothing
        QUEUE = "queue"  # it starts when the previous task has ended
        CANCEL = "cancel"  # the previous task is cancelled and the slot's starts

    class CatchUp(models.TextChoices):
        SKIP = "skip"  # slots missed while no worker ran start nothing
        ONE = "one"  # one task, for the latest missed slot
        ALL = "all"  # one task per missed slot (the latest AGENTS_SCHEDULE_CATCH_UP_MAX)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="agent_schedules"
    )
    agent_name = models.CharField(max_length=100)
    input = models.JSONField()
    cron = models.CharField(max_length=200, blank=True, default="")
    interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    timezone = models.CharField(max_length=64, default="UTC")
    overlap = models.CharField(max_length=10, choices=Overlap.choices, default=Overlap.SKIP)
    catch_up = models.CharField(max_length=10, choices=CatchUp.choices, default=CatchUp.ONE)
    paused = models.BooleanField(default=False)
    # The first slot not yet handled: the scheduler fires the schedule once it passes.
    next_slot = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=_now)
    updated_at = models.DateTimeField(default=_now)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(cron="") & Q(interval_seconds__gt=0))
                | (~Q(cron="") & Q(interval_seconds__isnull=True)),
                name="schedule_cron_or_interval",
            ),
        ]
        indexes = [
            models.Index(fields=["next_slot"], condition=Q(paused=False), name="schedule_due"),
        ]

    def __str__(self) -> str:
        when = self.cron or f"every {self.interval_seconds} s"
        return f"{self.agent_name} {when} ({self.timezone})"


class ScheduleFiring(models.Model):
    """One slot of a schedule, handled once: the unique (schedule, slot) row is what
    makes a slot start at most one task however many schedulers race for it."""

    class Outcome(models.TextChoices):
        STARTED = "started"
        QUEUED = "queued"  # waits for the schedule's running task (overlap ``queue``)
        SKIPPED = "skipped"  # overlap ``skip``, or a missed slot catch-up leaves out
        FAILED = "failed"  # the task could not start (its agent or input refused)

    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="firings")
    slot = models.DateTimeField()
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    reason = models.TextField(blank=True, default="")
    task = models.ForeignKey(
        AgentTask, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["schedule", "slot"]
        constraints = [
            models.UniqueConstraint(fields=["schedule", "slot"], name="schedule_firing_once"),
        ]
        indexes = [
            models.Index(
                fields=["schedule", "slot"],
                condition=Q(outcome="queued"),
                name="schedule_firing_queued",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.schedule_id} at {self.slot.isoformat()}: {self.outcome}"
