"""A work queue at its length limit pushes back: creation is refused with 503 and
Retry-After, and nothing half-created is left behind. On the real RabbitMQ limit."""

from __future__ import annotations

import json

import pytest

from agents.models import AgentTask, Checkpoint
from audit.models import AuditEvent
from tests.helpers import private_queues, worker_env
from tests.integration import scenario

pytestmark = pytest.mark.integration


def test_a_full_queue_refuses_new_tasks_with_503_and_leaves_nothing(transactional_db):
    with private_queues("full") as names:
        env = worker_env(**names, AGENTS_QUEUE_MAX_LENGTH="3")
        answers = json.loads(scenario.run(env, "flood", "8"))
    statuses = [status for status, _ in answers]
    accepted = statuses.count(201)
    # A quorum queue enforces its limit after the fact: it may hold one message more.
    assert statuses == [201] * accepted + [503] * (len(statuses) - accepted)
    assert accepted in (3, 4)
    assert all(int(retry) > 0 for status, retry in answers if status == 503)
    assert AgentTask.objects.count() == accepted
    assert Checkpoint.objects.count() == accepted
    assert AuditEvent.objects.filter(type="created").count() == accepted
