"""Dead letters on real workers: both ways in, and the way back out."""

from __future__ import annotations

import pytest
from django.conf import settings

from agents.core.dead_letters import dead_letter_requeue
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from agents_project.topology import dead_letter_queue
from audit.models import AuditEvent, DeadLetter
from tests.helpers import queue_depth, wait_until
from tests.integration import scenario

pytestmark = pytest.mark.integration

DLQ = dead_letter_queue(settings.AGENTS)


def _status(task_id) -> str:
    return AgentTask.objects.get(pk=task_id).status


def test_a_step_that_always_fails_is_dead_lettered_and_requeued(workers, user):
    workers.start(
        concurrency=2,
        AGENTS_MAX_RETRIES="2",
        AGENTS_RETRY_BACKOFF="0.05",
        AGENTS_RETRY_BACKOFF_MAX="0.2",
    )
    task, _ = task_start(
        owner=user,
        agent="scripted",
        input={
            "script": [
                {"tool": "ledger.append", "args": {"key": "k", "value": 1}},
                {"fail": "upstream rejects us", "times": 3},
                {"final": "ok"},
            ]
        },
    )
    wait_until(lambda: _status(task.pk) == TaskStatus.DEAD_LETTERED, timeout=60)
    letter = DeadLetter.objects.get(task=task)
    assert letter.reason == DeadLetter.Reason.RETRIES_EXHAUSTED
    assert (letter.step, letter.attempts) == (2, 3)
    assert "upstream rejects us" in letter.error and "Traceback" in letter.traceback
    assert letter.message["args"] == [str(task.pk), 2]
    failures = AuditEvent.objects.filter(task=task, type="step_failed").count()
    assert failures == 2, "two retried attempts; the third dead-lettered"
    wait_until(lambda: queue_depth(DLQ) == 1, timeout=30)

    # The operator gives the agent a bigger retry budget and requeues: it resumes from
    # its last checkpoint (the fourth attempt of step 2 succeeds) and leaves the DLQ.
    workers.stop_all()
    workers.start(concurrency=2, AGENTS_MAX_RETRIES="5", AGENTS_RETRY_BACKOFF="0.05")
    dead_letter_requeue(dead_letter_id=letter.pk, actor="user:operator")
    wait_until(lambda: _status(task.pk) == TaskStatus.COMPLETED, timeout=60)
    assert queue_depth(DLQ) == 0
    assert DeadLetter.objects.get(pk=letter.pk).requeued_by == "user:operator"
    assert task.ledger.count() == 1
    types = list(AuditEvent.objects.filter(task=task).values_list("type", flat=True))
    assert "requeued" in types


def test_a_step_that_kills_its_worker_every_time_is_dead_lettered(workers):
    # Every worker process that reaches step 2's commit dies (SIGKILL of the pool child).
    workers.start(concurrency=1, AGENTS_FAULT_INJECTION="before_commit@2")
    [task_id] = scenario.create(1)
    wait_until(lambda: _status(task_id) == TaskStatus.DEAD_LETTERED, timeout=120)
    letter = DeadLetter.objects.get(task_id=task_id)
    assert letter.reason == DeadLetter.Reason.WORKER_LOST
    assert letter.step == 2 and letter.attempts == settings.AGENTS["MAX_WORKER_LOSSES"]
    losses = AuditEvent.objects.filter(task_id=task_id, type="worker_lost").count()
    assert losses == settings.AGENTS["MAX_WORKER_LOSSES"]
    wait_until(lambda: queue_depth(DLQ) == 1, timeout=30)

    # With the fault gone (a fixed deploy), requeue it: it finishes, side effects once.
    workers.stop_all()
    workers.start(concurrency=1)
    dead_letter_requeue(dead_letter_id=letter.pk, actor="user:operator")
    wait_until(lambda: scenario.finished([task_id]), timeout=60)
    assert scenario.check([task_id]) == []
    assert queue_depth(DLQ) == 0
