"""Leases, against the real database."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction

from agents.core import clock
from agents.core.leases import leases_hand_back
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
