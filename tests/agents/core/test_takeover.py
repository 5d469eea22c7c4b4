"""Takeover of vanished holders and lost messages by the scheduler's sweep (issue 22),
driven in-process against the real database and RabbitMQ."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agents.core import clock
from agents.core.leases import Verdict, lease_claim
from agents.core.scheduler import (
    stuck_tasks_republish,
    vanished_tasks_republish,
    work_queue_ready,
)
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from tests.helpers import WORK_QUEUE, broker, queue_depth, run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)

GRACE = 10.0
SCRIPT = [{"tool": "ledger.append", "args": {"key": "k", "value": 1}}, {"final": "ok"}]
AWAY = "node-far/another-host:1/abc"


def start(user, script=SCRIPT) -> AgentTask:
    return task_start(owner=user, agent="scripted", input={"script": script})[0]


def lose_message() -> None:
    """Take the one queued step message off the queue for good (a purge, a lost disk)."""
    with broker() as conn:
        message = WORK_QUEUE(conn.default_channel).get(no_ack=False)
        assert message is not None
        message.ack()


def held_by_vanished_holder(task: AgentTask, *, expired_ago: float) -> int:
    """Step 1 claimed by a holder on another machine whose lease ran out ``expired_ago``
    seconds ago and was never renewed. Returns the holder's fence."""
    claim = lease_claim(task_id=task.pk, step=1, owner=AWAY)
    assert claim.verdict == Verdict.CLAIMED
    AgentTask.objects.filter(pk=task.pk).update(
        lease_expires_at=clock.now() - timedelta(seconds=expired_ago)
    )
    return claim.fence


def test_a_step_whose_holder_vanished_is_published_once_per_lease_and_completes(user):
    task = start(user)
    lose_message()  # its holder took it, then vanished with it (purged, host gone)
    fence = held_by_vanished_holder(task, expired_ago=GRACE + 1)
    assert stuck_tasks_republish(actor="test") == 0, "a message is counted in flight"
    assert vanished_tasks_republish(actor="test") == 1
    assert vanished_tasks_republish(actor="test") == 0, "once per lease, however long"
    assert queue_depth() == 1
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.fence > fence, "the takeover fenced the vanished holder out"
    assert AuditEvent.objects.filter(task=task, type="worker_lost").count() == 1
    assert task.ledger.count() == 1
    event = AuditEvent.objects.get(task=task, type="republished")
    assert event.step == 1 and "vanished" in event.payload["reason"]


def test_a_live_holder_within_its_lease_or_its_grace_is_never_copied(user):
    live = start(user)
    lease_claim(task_id=live.pk, step=1, owner=AWAY)  # renewed: expires in LEASE_TTL
    recent = start(user, [{"final": "ok"}])
    held_by_vanished_holder(recent, expired_ago=GRACE / 2)
    for _ in range(3):
        assert vanished_tasks_republish(actor="test") == 0
    assert not AuditEvent.objects.filter(type="republished").exists()


def test_a_lost_message_never_claimed_is_published_again_once_the_queue_is_empty(user):
    task = start(user)
    lose_message()
    AgentTask.objects.filter(pk=task.pk).update(
        updated_at=clock.now() - timedelta(seconds=GRACE + 1)
    )
    assert work_queue_ready() == 0
    assert vanished_tasks_republish(actor="test") == 0, "one sighting may be a claim under way"
    assert vanished_tasks_republish(actor="test") == 1, "seen twice, the queue empty: lost"
    assert vanished_tasks_republish(actor="test") == 0, "its publish is recent now"
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.ledger.count() == 1


def test_a_backlog_that_waited_past_the_grace_is_never_copied(user):
    tasks = [start(user) for _ in range(5)]
    AgentTask.objects.filter(pk__in=[t.pk for t in tasks]).update(
        updated_at=clock.now() - timedelta(seconds=10 * GRACE)
    )
    for _ in range(5):
        assert vanished_tasks_republish(actor="test") == 0
    assert queue_depth() == 5, "one message per task, nothing added"
    run_until_idle()
    assert not AuditEvent.objects.filter(type="republished").exists()
    assert set(AgentTask.objects.values_list("status", flat=True)) == {TaskStatus.COMPLETED}


def test_a_takeover_whose_copy_vanished_too_is_published_again_for_its_new_lease(user):
    task = start(user)
    lose_message()
    held_by_vanished_holder(task, expired_ago=GRACE + 1)
    assert vanished_tasks_republish(actor="test") == 1
    lose_message()  # the copy's holder vanished as well
    AgentTask.objects.filter(pk=task.pk).update(lease_owner="", lease_expires_at=None)
    held_by_vanished_holder(task, expired_ago=GRACE + 1)
    assert vanished_tasks_republish(actor="test") == 1, "a new lease, a new takeover"
    run_until_idle()
    task.refresh_from_db()
    assert (task.status, task.ledger.count()) == ("completed", 1)
    assert AuditEvent.objects.filter(task=task, type="republished").count() == 2
