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


class McpServer(models.Model):
    """An MCP tool server (``tools.mcp``): a command run over stdio, or a streamable-HTTP
    URL. ``owner`` None: the deployment's, usable by every owner's tasks; otherwise only
    that owner's tasks see it. Its tools are discovered from the server and cached here
    (``tools``, ``discovered_at``)."""

    class Approve(models.TextChoices):
        # A tool the server marks destructive (MCP's default for a tool that is not
        # read-only) needs a person's approval before each call.
        DESTRUCTIVE = "destructive"
        ALL = "all"
        NONE = "none"

    name = models.CharField(max_length=40)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="mcp_servers",
    )
    # stdio: the command and its arguments (argv, no shell); empty for an HTTP server.
    command = models.JSONField(default=list, blank=True)
    url = models.CharField(max_length=2000, blank=True, default="")
    # HTTP header name -> the name of the calling task owner's credential sent as its value.
    headers = models.JSONField(default=dict, blank=True)
    approve = models.CharField(max_length=20, choices=Approve.choices, default=Approve.DESTRUCTIVE)
    # Seconds one call (connect, call, answer) may take.
    timeout = models.FloatField(default=30.0)
    # The server's tools as it listed them: [{name, description, input_schema, annotations}].
    tools = models.JSONField(default=list, blank=True)
    discovered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=models.Q(owner__isnull=False),
                name="mcp_server_name_per_owner",
            ),
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(owner__isnull=True),
                name="mcp_server_name_deployment",
            ),
        ]

    def __str__(self) -> str:
        return f"mcp server {self.name} ({self.owner_id or 'deployment'})"


class ToolCallRecord(models.Model):
    """The result of one tool call, stored under its idempotency key as soon as it came
    back (``tools.runner``): a step that runs again uses it instead of calling again.
    Kept for every MCP tool call (MCP has no idempotency of its own) and for every call
    of a batch that runs concurrently (so a crash mid-batch reruns only the others)."""

    idempotency_key = models.CharField(max_length=200, unique=True)
    task = models.ForeignKey(
        "agents.AgentTask", on_delete=models.CASCADE, related_name="tool_call_records"
    )
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    tool = models.CharField(max_length=300)
    ok = models.BooleanField()
    value = models.JSONField(null=True)
    error = models.TextField(blank=True, default="")
    duration_ms = models.FloatField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.tool} {self.idempotency_key}"
