"""Data the built-in tools keep, and the credentials tools are given."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class LedgerEntry(models.Model):
    """One side effect of ``ledger.append``: exactly one row per idempotency key.

    Counting rows per key is how the crash tests prove a side effect happened once.
    """

    idempotency_key = models.CharField(max_length=200, unique=True)
    task = models.ForeignKey("agents.AgentTask", on_delete=models.CASCADE, related_name="ledger")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    key = models.CharField(max_length=200)
    value = models.JSONField(null=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.key}={self.value!r} ({self.idempotency_key})"


class Credential(models.Model):
    """A secret that the tools of one owner's tasks (or of one task) may use.

    Only the Fernet ciphertext is stored (``tools.credentials`` encrypts and decrypts);
    the value is handed to tool calls through ``ToolContext.credentials`` and never
    appears in checkpoints, audit events, logs, the API or the admin. A credential with
    a ``task`` is seen by that task alone, and wins over the owner's of the same name.
    """

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="credentials"
    )
    task = models.ForeignKey(
        "agents.AgentTask",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="credentials",
    )
    name = models.CharField(max_length=100)
    ciphertext = models.TextField(editable=False)
    # The hosts this credential may be sent to (``api.example.com``, or ``*.example.com``
    # for its subdomains, ``*`` when set with ``--any-host``); empty (only on rows stored
    # before hosts were required, reported by ``check --deploy``): sent to no host.
    hosts = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["owner", "name", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=models.Q(task__isnull=True),
                name="credential_name_per_owner",
            ),
            models.UniqueConstraint(
                fields=["task", "name"],
                condition=models.Q(task__isnull=False),
                name="credential_name_per_task",
            ),
        ]

    def __str__(self) -> str:
        scope = f"task {self.task_id}" if self.task_id else f"owner {self.owner_id}"
        return f"credential {self.name} ({scope})"


class KVEntry(models.Model):
    """A value kept by the ``kv.set`` tool: per task (the default) or shared by the
    owner's tasks. No other owner's task can read or write it."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    task = models.ForeignKey(
        "agents.AgentTask",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="kv_entries",
    )
    key = models.CharField(max_length=200)
    value = models.JSONField(null=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["owner", "key", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "key"],
                condition=models.Q(task__isnull=True),
                name="kv_key_per_owner",
            ),
            models.UniqueConstraint(
                fields=["task", "key"],
                condition=models.Q(task__isnull=False),
                name="kv_key_per_task",
            ),
        ]

    def __str__(self) -> str:
        return self.key


class Breaker(models.Model):
    """Not a table: circuit breakers live in Redis (``tools.breakers``). The model exists
    so that reading and forcing breakers are ordinary Django permissions
    (``tools.view_breaker``, ``tools.change_breaker``) that can be given to a group."""

    name = models.CharField(max_length=200, primary_key=True)

    class Meta:
        managed = False
        default_permissions = ("view", "change")

    def __str__(self) -> str:
        return self.name
