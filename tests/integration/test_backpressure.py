"""A work queue at its length limit pushes back: creation is refused with 503 and
Retry-After, and nothing half-created is left behind. On the real RabbitMQ limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from agents.models import AgentTask, Checkpoint
from audit.models import AuditEvent
from tests.helpers import worker_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_full_queue_refuses_new_tasks_with_503_and_leaves_nothing(transactional_db, settings):
    names = uuid.uuid4().hex[:8]
    env = worker_env(
        AGENTS_QUEUE=f"full-{names}.steps",
        AGENTS_DEAD_LETTER_EXCHANGE=f"full-{names}.dlx",
        AGENTS_DEAD_LETTER_QUEUE=f"full-{names}.dead",
        AGENTS_QUEUE_MAX_LENGTH="3",
    )
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tests.integration.scenario", "flood", "8"],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    finally:
        with Connection(settings.CELERY_BROKER_URL) as conn:
            channel = conn.default_channel
            channel.queue_delete(f"full-{names}.steps")
            channel.exchange_delete(f"full-{names}.steps")
    answers = json.loads(out)
    statuses = [status for status, _ in answers]
    accepted = statuses.count(201)
    # A quorum queue enforces its limit after the fact: it may hold one message more.
    assert statuses == [201] * accepted + [503] * (len(statuses) - accepted)
    assert accepted in (3, 4)
    assert all(int(retry) > 0 for status, retry in answers if status == 503)
    assert AgentTask.objects.count() == accepted
    assert Checkpoint.objects.count() == accepted
    assert AuditEvent.objects.filter(type="created").count() == accepted
