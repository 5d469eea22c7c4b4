"""Request and response shapes. Requests are checked for type and size here; what an
input means (which agent, which checkpoint) is checked by the services."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agents.diagnosis import task_diagnosis, task_error_text
from agents.models import AgentTask, Checkpoint, Schedule, ScheduleFiring, Signal, TaskStatus
from agents.selectors import task_usage, task_usage_none
from agents_project.errors import InvalidInput
from agents_project.validation import json_value_check
from audit.models import AuditEvent, DeadLetter
from audit.timeline import describe

# Step numbers and sequence numbers are PostgreSQL integers: refuse what cannot be one.
MAX_INT = 2**31 - 1


class StrictCharField(serializers.CharField):
    """A string, and only a string: DRF's CharField would turn 5 into "5"."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """``true`` or ``false``: DRF's BooleanField also takes "yes", "on", 1..."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: not a string of digits, not 3.0, not ``true``."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictNumberField(serializers.FloatField):
    """A JSON number (int or float), not a string."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StorableJSONField(serializers.JSONField):
    """Any JSON value the database can store, no larger than ``AGENTS_MAX_INPUT_BYTES``
    (``agents_project.validation``, the same check the services make), refused as a 400 naming
    the field rather than surfacing as a database error."""

    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        try:
            json_value_check(value, field=self.field_name)
        except InvalidInput as exc:
            raise serializers.ValidationError(exc.message) from None
        return value


# --- Requests -----------------------------------------------------------------------------


class RequestSerializer(serializers.Serializer):
    """A request body: a JSON object with these fields and no others, so that a typo
    (``timeout`` for ``timeout_seconds``) is an error rather than silently ignored."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {key: ["is not a field of this request"] for key in unknown}
                )
        return super().to_internal_value(data)


class TaskCreateSerializer(RequestSerializer):
    agent = StrictCharField(max_length=100, help_text="The name of a registered agent.")
    input = StorableJSONField(help_text="The agent's input; its shape is the agent's own.")
    idempotency_key = StrictCharField(
        max_length=200,
        required=False,
        allow_null=True,
        help_text="Sending the same key again returns the task it created (200, not 201).",
    )
    timeout_seconds = StrictNumberField(
        required=False,
        allow_null=True,
        help_text="The task's deadline, in seconds from now (above 0, at most a year).",
    )


class TaskBatchCreateSerializer(RequestSerializer):
    agent = StrictCharField(max_length=100, help_text="The name of a registered agent.")
    inputs = serializers.ListField(
        child=StorableJSONField(),
        min_length=1,
        max_length=1000,
        help_text="One input per task (1 to 1000), each the agent's own shape.",
    )


class TaskQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=TaskStatus.choices, required=False)
    agent = serializers.CharField(max_length=100, required=False)


class ApproveSerializer(RequestSerializer):
    decision = serializers.ChoiceField(
        choices=("approve", "edit", "reject", "respond"),
        required=False,
        help_text="approve; edit (run the tool call with `args`); reject; respond (do not "
        "run it: `message` is its result). edit and respond: a tool call's approval only.",
    )
    approved = StrictBooleanField(
        required=False, help_text="The older form: true approves, false rejects."
    )
    args = StorableJSONField(
        required=False, help_text="edit: the tool call's new arguments (its JSON Schema)."
    )
    message = StrictCharField(
        required=False, max_length=100_000, help_text="respond: the tool call's result."
    )
    comment = StrictCharField(required=False, allow_blank=True, max_length=10_000, default="")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # Checked before the task's state: a body without a decision is a 400 whatever
        # the task is doing (named ``approved``, the field of the older form).
        if "decision" not in attrs and "approved" not in attrs:
            raise serializers.ValidationError(
                {"approved": ["give decision (approve, edit, reject, respond) or approved"]}
            )
        return attrs


class SignalSerializer(RequestSerializer):
    name = StrictCharField(max_length=200)
    payload = StorableJSONField(required=False, allow_null=True, default=None)


class HoldSerializer(RequestSerializer):
    held = serializers.BooleanField(help_text="true: place the hold; false: release it.")
    reason = serializers.CharField(
        required=False, allow_blank=True, max_length=2000, default="", help_text="Why (audited)."
    )


class ReplaySerializer(RequestSerializer):
    from_step = StrictIntegerField(
        required=False,
        allow_null=True,
        min_value=0,
        max_value=MAX_INT,
        help_text="The checkpoint to start from; the latest when absent.",
    )


class SeekQuerySerializer(serializers.Serializer):
    after = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_INT,
        help_text="Return the rows after this one (the previous page's last seq or step).",
    )
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=100)


class DeadLetterQuerySerializer(serializers.Serializer):
    open = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="true: only letters not requeued yet; false: only requeued ones.",
    )
    task = serializers.UUIDField(required=False)


# --- Responses ----------------------------------------------------------------------------


class UsageSerializer(serializers.Serializer):
    model_calls = serializers.IntegerField(help_text="Model calls made (a reused one once).")
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    cost = serializers.FloatField(help_text="In the currency of AGENTS_LLM_MODELS' prices.")


class TaskSerializer(serializers.ModelSerializer):
    agent = serializers.CharField(source="agent_name", read_only=True)
    owner = serializers.CharField(source="owner.get_username", read_only=True)
    status = serializers.ChoiceField(choices=TaskStatus.choices, read_only=True)
    replayed_from = serializers.UUIDField(
        source="replayed_from_id", read_only=True, allow_null=True
    )
    parent = serializers.UUIDField(
        source="parent_id",
        read_only=True,
        allow_null=True,
        help_text="The task whose step started this one (a child task); null otherwise.",
    )
    schedule = serializers.UUIDField(
        source="schedule_id",
        read_only=True,
        allow_null=True,
        help_text="The schedule that started the task (its slot: schedule_slot).",
    )
    error = serializers.SerializerMethodField(
        help_text="Why the task failed or was dead-lettered; empty otherwise."
    )
    usage = serializers.SerializerMethodField(
        help_text="Model calls of the task and their tokens and cost."
    )
    trace_id = serializers.CharField(
        read_only=True,
        help_text="The task's OpenTelemetry trace id (32 hex digits); empty when it was "
        "created with tracing off.",
    )

    class Meta:
        model = AgentTask
        fields: tuple[str, ...] = (
            "id",
            "agent",
            "agent_version",
            "owner",
            "status",
            "current_step",
            "attempt",
            "input",
            "result",
            "error",
            "idempotency_key",
            "deadline",
            "replayed_from",
            "replayed_from_step",
            "parent",
            "spawn_step",
            "spawn_index",
            "schedule",
            "schedule_slot",
            "created_at",
            "updated_at",
            "status_changed_at",
            "finished_at",
            "legal_hold",
            "usage",
            "trace_id",
        )
        read_only_fields: tuple[str, ...] = fields

    def get_error(self, task: AgentTask) -> str:
        return task_error_text(task)

    @extend_schema_field(UsageSerializer)
    def get_usage(self, task: AgentTask) -> dict[str, Any]:
        if self.context.get("created"):
            return task_usage_none()  # tasks just created: no model call yet
        return task_usage(task_id=task.pk)


class WaitingOnSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(
        choices=[
            "approval",
            "event",
            "timer",
            "children",
            "breaker",
            "retry",
            "admission",
            "worker",
            "operator",
        ]
    )
    detail = serializers.CharField()
    since = serializers.DateTimeField(allow_null=True)
    until = serializers.DateTimeField(allow_null=True)


class LastErrorSerializer(serializers.Serializer):
    message = serializers.CharField(allow_blank=True)
    type = serializers.CharField(help_text="The exception's class, or the event type.")
    step = serializers.IntegerField(allow_null=True)
    seq = serializers.IntegerField(allow_null=True, help_text="The audit event's sequence.")
    at = serializers.DateTimeField(allow_null=True)


class OpenBreakerSerializer(serializers.Serializer):
    name = serializers.CharField()
    state = serializers.ChoiceField(choices=["closed", "open", "half-open", "unknown"])
    forced = serializers.BooleanField(help_text="Held open by an operator until closed.")
    opened_at = serializers.DateTimeField(allow_null=True)
    remaining_seconds = serializers.FloatField(allow_null=True)


class DiagnosisSerializer(serializers.Serializer):
    """``agents.diagnosis.task_diagnosis``: why the task is where it is."""

    status = serializers.ChoiceField(choices=TaskStatus.choices)
    summary = serializers.CharField(help_text="One sentence for a person.")
    waiting_on = WaitingOnSerializer(allow_null=True)
    last_error = LastErrorSerializer(allow_null=True)
    attempt = serializers.IntegerField(help_text="Failed attempts of the current step.")
    next_retry_at = serializers.DateTimeField(allow_null=True)
    open_breaker = OpenBreakerSerializer(
        allow_null=True, help_text="The breaker the current step waits on, if any."
    )
    deadline = serializers.DateTimeField(allow_null=True)
    deadline_in_seconds = serializers.FloatField(
        allow_null=True, help_text="Negative once the deadline has passed."
    )


class TaskDetailSerializer(TaskSerializer):
    """One task, with ``diagnosis``: what it waits for, its last error, its breaker."""

    diagnosis = serializers.SerializerMethodField()

    class Meta(TaskSerializer.Meta):
        fields = (*TaskSerializer.Meta.fields, "diagnosis")
        read_only_fields = fields

    @extend_schema_field(DiagnosisSerializer)
    def get_diagnosis(self, task: AgentTask) -> dict[str, Any]:
        return dict(DiagnosisSerializer(task_diagnosis(task)).data)


class TaskListItemSerializer(TaskSerializer):
    """A task in a list: everything but its input, which may be large, and its usage
    (a query per task)."""

    class Meta(TaskSerializer.Meta):
        fields = tuple(f for f in TaskSerializer.Meta.fields if f not in ("input", "usage"))
        read_only_fields = fields


class AuditEventSerializer(serializers.ModelSerializer):
    summary = serializers.SerializerMethodField(help_text="One line saying what happened.")

    class Meta:
        model = AuditEvent
        fields = ("seq", "type", "step", "actor", "created_at", "payload", "summary")
        read_only_fields = fields

    def get_summary(self, event: AuditEvent) -> str:
        return describe(event)


class AuditPageSerializer(serializers.Serializer):
    results = AuditEventSerializer(many=True)
    next = serializers.URLField(allow_null=True, help_text="The next page, or null at the end.")


class CheckpointSerializer(serializers.ModelSerializer):
    class Meta:
        model = Checkpoint
        fields = ("step", "state", "observations", "schema_version", "created_at")
        read_only_fields = fields


class CheckpointPageSerializer(serializers.Serializer):
    results = CheckpointSerializer(many=True)
    next = serializers.URLField(allow_null=True, help_text="The next page, or null at the end.")


class SignalOutSerializer(serializers.ModelSerializer):
    task = serializers.UUIDField(source="task_id", read_only=True)

    class Meta:
        model = Signal
        fields = ("id", "task", "name", "payload", "created_at", "consumed_at", "consumed_at_step")
        read_only_fields = fields


class DeadLetterSerializer(serializers.ModelSerializer):
    task = serializers.UUIDField(source="task_id", read_only=True)
    task_status = serializers.ChoiceField(
        source="task.status", choices=TaskStatus.choices, read_only=True
    )

    class Meta:
        model = DeadLetter
        fields = (
            "id",
            "task",
            "task_status",
            "step",
            "reason",
            "error",
            "traceback",
            "attempts",
            "message",
            "created_at",
            "requeued_at",
            "requeued_by",
        )
        read_only_fields = fields


class BreakerSerializer(serializers.Serializer):
    """``tools.breakers.BreakerStatus``."""

    name = serializers.CharField()
    state = serializers.ChoiceField(choices=["closed", "open", "half-open"])
    forced = serializers.BooleanField(help_text="Held open by an operator until closed.")
    failures = serializers.IntegerField(help_text="Consecutive failures counted while closed.")
    fail_max = serializers.IntegerField(help_text="Failures in a row that open it.")
    reset_timeout = serializers.FloatField(help_text="Seconds open before a trial call.")
    opened_at = serializers.DateTimeField(allow_null=True)
    remaining = serializers.FloatField(
        allow_null=True, help_text="Seconds until a trial call; null while held open."
    )
    shared = serializers.BooleanField(help_text="State shared through Redis (else per process).")


class ErrorSerializer(serializers.Serializer):
    error = serializers.CharField(help_text="A stable code: invalid, not_found, conflict...")
    detail = serializers.CharField(help_text="What is wrong, for a person.")
    field = serializers.CharField(required=False, help_text="The input at fault, as a path.")


class TokenSerializer(serializers.Serializer):
    """A new API token (``POST /api/token/rotate/``): shown once."""

    token = serializers.CharField(help_text="Send it as `Authorization: Token <token>`.")
    created = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(
        allow_null=True, help_text="After this it is refused (AGENTS_API_TOKEN_MAX_AGE)."
    )


# --- Schedules ----------------------------------------------------------------------------


class ScheduleWriteSerializer(RequestSerializer):
    """A schedule's fields as sent; what they mean (a valid cron expression, a known
    agent and time zone) is checked by ``agents.schedules``, naming the field."""

    agent = StrictCharField(max_length=100, help_text="The name of a registered agent.")
    input = StorableJSONField(help_text="The input of every task it starts.")
    cron = StrictCharField(
        required=False,
        allow_null=True,
        max_length=200,
        help_text="A cron expression (croniter's syntax), on the wall clock of `timezone`.",
    )
    interval_seconds = StrictIntegerField(
        required=False,
        allow_null=True,
        help_text="Instead of cron: every this many seconds (slots counted from the epoch).",
    )
    timezone = StrictCharField(required=False, max_length=64, help_text="An IANA name.")
    overlap = serializers.ChoiceField(choices=Schedule.Overlap.choices, required=False)
    catch_up = serializers.ChoiceField(choices=Schedule.CatchUp.choices, required=False)
    paused = StrictBooleanField(required=False)


class ScheduleFiringSerializer(serializers.ModelSerializer):
    task = serializers.UUIDField(source="task_id", read_only=True, allow_null=True)

    class Meta:
        model = ScheduleFiring
        fields = ("slot", "outcome", "reason", "task", "actor", "created_at")
        read_only_fields = fields


class ScheduleSerializer(serializers.ModelSerializer):
    agent = serializers.CharField(source="agent_name", read_only=True)
    owner = serializers.CharField(source="owner.get_username", read_only=True)

    class Meta:
        model = Schedule
        fields: tuple[str, ...] = (
            "id",
            "agent",
            "input",
            "cron",
            "interval_seconds",
            "timezone",
            "overlap",
            "catch_up",
            "paused",
            "next_slot",
            "owner",
            "created_at",
            "updated_at",
        )
        read_only_fields: tuple[str, ...] = fields


class ScheduleDetailSerializer(ScheduleSerializer):
    firings = serializers.SerializerMethodField(help_text="The latest 20 slots handled.")

    class Meta(ScheduleSerializer.Meta):
        fields = (*ScheduleSerializer.Meta.fields, "firings")
        read_only_fields = fields

    @extend_schema_field(ScheduleFiringSerializer(many=True))
    def get_firings(self, schedule: Schedule) -> Any:
        latest = schedule.firings.order_by("-slot")[:20]
        return ScheduleFiringSerializer(latest, many=True).data
