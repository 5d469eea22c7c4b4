"""Celery tasks (and a tool) for the benchmarks: the baseline arms of
benchmarks/step_overhead.py, and a failing tool for benchmarks/recovery.py.

Loaded into the worker with ``AGENTS_MODULES=benchmarks.bench_tasks``; same queue, same
Celery settings (acks late, prefetch 1, publisher confirms) as the engine's steps.
"""

from __future__ import annotations

import time

import redis
from celery import shared_task
from django.conf import settings
from django.db import transaction

from agents.errors import RetryableError
from agents.models import AgentTask, Checkpoint
from audit.models import AuditEvent
from tools.registry import ToolContext, tool

PAD = "x" * 2000
_redis = None


def _redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(settings.REDIS_URL)
    return _redis


def _done(run_id: str) -> None:
    _redis_client().rpush(f"bench:{run_id}", time.time())


@shared_task(name="bench.bare", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def bare(run_id: str, remaining: int) -> None:
    """Arm (a): do nothing but enqueue the next hop."""
    if remaining > 1:
        bare.apply_async((run_id, remaining - 1))
    else:
        _done(run_id)


@shared_task(
    name="bench.checkpointed", acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def checkpointed(run_id: str, task_id: str, step: int, remaining: int) -> None:
    """Arm (b): one checkpoint-shaped transaction, then enqueue the next hop.

    Lock the task row, insert a ~2 KB JSON checkpoint, insert two audit rows, update
    the task row: what a step must write at the least, with nothing else around it.
    """
    with transaction.atomic():
        task = AgentTask.objects.select_for_update().get(pk=task_id)
        Checkpoint.objects.create(task=task, step=step, state={"pad": PAD}, schema_version=1)
        AuditEvent.objects.bulk_create(
            [
                AuditEvent(task=task, seq=task.audit_seq + 1, type="step", actor="bench"),
                AuditEvent(task=task, seq=task.audit_seq + 2, type="step", actor="bench"),
            ]
        )
        task.audit_seq += 2
        task.current_step = step + 1
        task.save(update_fields=("audit_seq", "current_step"))
    if remaining > 1:
        checkpointed.apply_async((run_id, task_id, step + 1, remaining - 1))
    else:
        _done(run_id)


@tool("bench.fail_stamped", args={}, timeout=1.0)
def fail_stamped(ctx: ToolContext, args: dict) -> None:
    """Always fails, after noting when (the start of the dead-letter clock)."""
    _redis_client().rpush(f"bench:failed:{ctx.task_id}", time.time())
    raise RetryableError("bench: this dependency is down")
