"""What the rollout of agent versions records.

- ``WorkerVersion``: one row per worker process and agent it serves, written by the
  worker's scheduler every few seconds (``agents.core.versions``): a worker is live
  while its ``last_seen`` is recent (``AGENTS_WORKER_TTL``).
- ``VersionHold``: a version of an agent that takes no new tasks (a rollback); its
  running tasks carry on, on workers that serve it.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


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
        constraints = [
            models.UniqueConstraint(fields=["agent", "version"], name="version_hold_once"),
        ]

    def __str__(self) -> str:
        return f"{self.agent} {self.version} takes no new tasks"
