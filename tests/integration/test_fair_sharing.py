"""Fair sharing on a real worker (issue 12, item 9): one owner holding 2,000 queued
tasks does not delay another owner's new task. Asserted by counts, never by time: the
second owner's task completes while the first still has more than 1,900 not started."""

from __future__ import annotations

import pytest

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from tests.helpers import queue_depth, wait_until

pytestmark = pytest.mark.integration

LIMIT = 4
FLOOD = 2000


def test_a_flooding_owner_does_not_delay_another_owners_task(workers, user, other_user, settings):
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": LIMIT}
    script = {"script": [{"think": "a"}, {"think": "b"}, {"final": "done"}]}
    for _ in range(FLOOD):
        task_start(owner=user, agent="scripted", input=script)
    assert AgentTask.objects.filter(owner=user, queued_for_admission=True).count() == FLOOD - LIMIT
    assert queue_depth() == LIMIT, "tasks over the limit hold no broker message"

    workers.start(concurrency=2, AGENTS_OWNER_MAX_RUNNING=str(LIMIT))
    theirs = task_start(owner=other_user, agent="scripted", input=script)[0]
    assert not theirs.queued_for_admission

    finished = wait_until(
        lambda: AgentTask.objects.filter(pk=theirs.pk, status=TaskStatus.COMPLETED).exists(),
        timeout=120,
    )
    assert finished, workers.report()
    not_started = AgentTask.objects.filter(
        owner=user, status=TaskStatus.PENDING, current_step=1
    ).count()
    assert not_started > 1900, not_started

    # The flood is admitted as places free, never above the limit, and all of it runs.
    def flood_progress() -> bool:
        admitted = AgentTask.objects.filter(
            owner=user, status__in=(TaskStatus.PENDING, TaskStatus.RUNNING)
        ).filter(queued_for_admission=False)
        assert admitted.count() <= LIMIT
        return AgentTask.objects.filter(owner=user, status=TaskStatus.COMPLETED).count() >= 40

    assert wait_until(flood_progress, timeout=120), workers.report()
