"""A parent's worker killed at each point of the step that starts its children: the
children exist once, each side effect happens once, and the parent joins them."""

from __future__ import annotations

import pytest

from agents.core.faults import WORKER_POINTS
from agents.models import AgentTask
from agents.services import service_user, task_start
from audit.models import AuditEvent
from tests.helpers import wait_until
from tests.integration import scenario

pytestmark = pytest.mark.integration

CHILD = [{"tool": "ledger.append", "args": {"key": "k", "value": 1}}, {"final": "child"}]
PARENT = [
    {"think": "fan out"},
    {"spawn": [{"agent": "scripted", "input": {"script": CHILD}}] * 3},
    {"final": "joined"},
]


@pytest.mark.parametrize("point", WORKER_POINTS)
def test_a_worker_killed_while_starting_children_starts_each_once(workers, point, tmp_path):
    fired = tmp_path / "fired"
    # Step 2 is the parent's spawn: no child exists before it commits, so the parent's
    # step is the first to reach the point.
    workers.start(
        concurrency=2, AGENTS_FAULT_INJECTION=f"{point}@2", AGENTS_FAULT_ONCE_FILE=str(fired)
    )
    parent, _ = task_start(
        owner=service_user("recovery"), agent="scripted", input={"script": PARENT}
    )
    wait_until(fired.exists, timeout=60)
    workers.kill(0)
    workers.start(concurrency=2)
    wait_until(lambda: scenario.finished([str(parent.pk)]), timeout=90)
    children = [
        str(pk) for pk in AgentTask.objects.filter(parent=parent).values_list("pk", flat=True)
    ]
    assert len(children) == 3
    assert scenario.check([str(parent.pk)], script=PARENT) == []
    wait_until(lambda: scenario.finished(children), timeout=30)
    assert scenario.check(children, script=CHILD) == []
    assert AuditEvent.objects.filter(task=parent, type="children_started").count() == 1
    parent.refresh_from_db()
    assert parent.status == "completed"
    assert parent.result == "joined"
