"""Data the built-in tools keep."""

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
