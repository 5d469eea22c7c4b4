"""Leases, against the real database."""

from __future__ import annotations

import socket
import subprocess
import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction

from agents.core import clock
from agents.core.leases import Verdict, lease_claim, leases_hand_back
from agents.models import AgentTask
from agents.services import task_start

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_graceful_hand_back_skips_a_row_a_frozen_commit_holds(user):
    """A worker past its shutdown grace freezes its pool, then hands its leases back. A
    pool process frozen inside its step's commit holds its task's row until it is
    killed: the hand-back skips that row instead of waiting for it (it used to wait
    forever, and the worker never exited)."""
    script = {"script": [{"think": "a"}, {"final": 1}]}
    frozen, other = (task_start(owner=user, agent="scripted", input=script)[0] for _ in range(2))
    AgentTask.objects.filter(pk__in=[frozen.pk, other.pk]).update(
        lease_owner="node-1/host:1/abc", lease_expires_at=clock.now() + timedelta(seconds=60)
    )
    locked, release = threading.Event(), threading.Event()

    def commit_frozen_midway() -> None:
        try:
            with transaction.atomic():
                AgentTask.objects.select_for_update().get(pk=frozen.pk)
                locked.set()
                release.wait(10)
        finally:
            connections["default"].close()

    holder = threading.Thread(target=commit_frozen_midway)
    holder.start()
    try:
        assert locked.wait(10)
        assert leases_hand_back(node="node-1") == 1
    finally:
        release.set()
        holder.join(15)
    assert AgentTask.objects.get(pk=other.pk).lease_owner == ""
    assert AgentTask.objects.get(pk=frozen.pk).lease_owner == "node-1/host:1/abc"


def test_an_expired_lease_whose_holder_lives_here_is_waited_for_not_taken_over(user):
    """A step that gave its message back in a database outage releases its lease once
    the database answers, from its heartbeat. A redelivery that gets there first finds
    the lease expired, its holder alive on this machine: it waits for the release, so
    the give-back is not counted as a lost worker."""
    task = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})[0]
    holder = subprocess.Popen(["sleep", "60"])
    try:
        AgentTask.objects.filter(pk=task.pk).update(
            lease_owner=f"node-1/{socket.gethostname()}:{holder.pid}/abc",
            lease_expires_at=clock.now() - timedelta(seconds=1),
        )

        def release() -> None:
            try:
                AgentTask.objects.filter(pk=task.pk).update(lease_owner="", lease_expires_at=None)
            finally:
                connections["default"].close()

        threading.Timer(0.3, release).start()
        claim = lease_claim(task_id=task.pk, step=1, owner="node-2/elsewhere:1/def")
    finally:
        holder.kill()
        holder.wait()
    assert claim.verdict == Verdict.CLAIMED
    assert not claim.took_over
    assert AgentTask.objects.get(pk=task.pk).worker_losses == 0


def test_an_expired_lease_whose_holder_died_here_is_taken_over_at_once(user):
    task = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})[0]
    gone = subprocess.Popen(["true"])
    gone.wait()
    AgentTask.objects.filter(pk=task.pk).update(
        lease_owner=f"node-1/{socket.gethostname()}:{gone.pid}/abc",
        lease_expires_at=clock.now() - timedelta(seconds=1),
    )
    claim = lease_claim(task_id=task.pk, step=1, owner="node-2/elsewhere:1/def")
    assert claim.verdict == Verdict.CLAIMED
    assert claim.took_over
    assert AgentTask.objects.get(pk=task.pk).worker_losses == 1
