"""Hand-offs (``agents.core.handoffs``) on PostgreSQL: a consumer's claim of a step."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction

from agents.core import clock
from agents.core.handoffs import HandOffClaim, handoff_claim, queued_owner
from agents.core.leases import lease_owner_name
from agents.models import AgentTask, TaskStatus
from agents.services import task_start

pytestmark = pytest.mark.django_db(transaction=True)


def _someone_waits_for_a_row_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # read it afresh in this transaction
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


def test_a_hand_off_claimed_before_its_transaction_commits_waits_for_the_commit(user):
    # The hand-off message goes out before the transaction that passes the lease to the
    # queue commits (``step_hand_off``): a claim that arrives first waits for that commit
    # and takes the step at once, not after the worker's lease would have expired (the
    # step's time limit is gone by then).
    task = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})[0]
    worker = lease_owner_name("worker-test")
    AgentTask.objects.filter(pk=task.pk).update(
        status=TaskStatus.RUNNING,
        lease_owner=worker,
        lease_expires_at=clock.now() + timedelta(seconds=60),
    )
    row = AgentTask.objects.get(pk=task.pk)
    gateway = lease_owner_name("test-gateway")
    handing_off = threading.Event()
    claim_done = threading.Event()

    def hand_off() -> None:
        try:
            with transaction.atomic():
                AgentTask.objects.filter(pk=task.pk, lease_owner=worker).update(
                    lease_owner=queued_owner(),
                    lease_expires_at=clock.now() + timedelta(seconds=300),
                )
                handing_off.set()
                # Commit once the claim waits for this row (or has given up without).
                while not claim_done.is_set() and not _someone_waits_for_a_row_lock():
                    claim_done.wait(0.01)
        finally:
            connection.close()

    thread = threading.Thread(target=hand_off)
    thread.start()
    try:
        assert handing_off.wait(30)
        claim = handoff_claim(
            task_id=task.pk,
            step=row.current_step,
            fence=row.fence,
            holder=gateway,
        )
    finally:
        claim_done.set()
        thread.join(30)
    assert claim == HandOffClaim(True)
    row.refresh_from_db()
    assert row.lease_owner == gateway
