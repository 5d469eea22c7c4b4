"""What the LLM layer records: every model call and every conversation message.

- ``ModelCall``: one chat-completions response, stored as soon as it arrives under the
  idempotency key of the call (``task id : step : purpose[:n]``), with its usage, cost
  and duration. A step that runs again finds it and uses it instead of asking the model
  again, so a response is paid for once.
- ``Message``: one row per message of a task's conversation, in order (``seq``). A step
  writes only the messages it adds; the checkpoint's state refers to them by count.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class ModelCall(models.Model):
    class Purpose(models.TextChoices):
        REPLY = "reply"
        SUMMARY = "summary"

    # No index of its own: (task, step) serves every lookup by task.
    task = models.ForeignKey(
        "agents.AgentTask", on_delete=models.CASCADE, related_name="model_calls", db_index=False
    )
    # The task's owner, kept here for the per-owner daily token budget.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="model_calls"
    )
    step = models.PositiveIntegerField()
    key = models.CharField(max_length=300, unique=True)
    purpose = models.CharField(max_length=20, choices=Purpose.choices, default=Purpose.REPLY)
    model = models.CharField(max_length=200)
    endpoint = models.CharField(max_length=500)
    # The chat.completion object as the server sent it.
    response = models.JSONField()
    finish_reason = models.CharField(max_length=50, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    # True when the server gave no usage and the counts are llm.context's estimate.
    usage_estimated = models.BooleanField(default=False)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    duration_ms = models.FloatField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["task", "step", "id"]
        indexes = [
            models.Index(fields=["task", "step"], name="model_call_task_step"),
            models.Index(fields=["owner", "created_at"], name="model_call_owner_created"),
        ]

    def __str__(self) -> str:
        return f"{self.model} call {self.key}"


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"

    # No index of its own: the (task, seq) unique index serves every lookup by task.
    task = models.ForeignKey(
        "agents.AgentTask", on_delete=models.CASCADE, related_name="llm_messages", db_index=False
    )
    # 0, 1, 2 ... per task, with no gaps: the conversation's order.
    seq = models.PositiveIntegerField()
    # The step that added it.
    step = models.PositiveIntegerField()
    role = models.CharField(max_length=20, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    # An assistant message's tool calls, in the chat-completions shape.
    tool_calls = models.JSONField(null=True, blank=True)
    # A tool message: the id of the call it answers, and the tool's name.
    tool_call_id = models.CharField(max_length=200, blank=True, default="")
    name = models.CharField(max_length=200, blank=True, default="")
    # Kept by the ``select`` context policy whatever else is left out.
    pinned = models.BooleanField(default=False)
    # The sub-task it belongs to (``select`` keeps the current one's turns).
    subtask = models.PositiveIntegerField(default=0)
    # Estimated tokens of this message (llm.context.estimate_tokens).
    tokens = models.PositiveIntegerField(default=0)
    # The model call that produced it (assistant messages).
    model_call = models.ForeignKey(
        ModelCall, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["task", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["task", "seq"], name="llm_message_seq_per_task"),
        ]
        indexes = [
            models.Index(
                fields=["task", "seq"],
                condition=models.Q(pinned=True),
                name="llm_message_pinned",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} #{self.seq} {self.role}"
