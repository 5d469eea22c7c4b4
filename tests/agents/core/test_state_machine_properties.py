"""Random sequences of everything that can happen to a task, checked after every move.

Hypothesis drives deliveries, duplicate and stale deliveries, lost messages and the
sweep that recovers them, approvals, rejections, signals, cancellations and the
scheduler's clock, in any order, against the real database and queue. After each move:
no status outside the eight, every recorded transition in the table and chained, no
step committed twice or skipped, a gap-free audit trail, each side effect at most once.
At the end, driven to completion, the task has ended and stays ended.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from agents.core.engine import step_execute
from agents.core.scheduler import stuck_tasks_republish, tick
from agents.core.state_machine import FINAL, TRANSITIONS
from agents.core.suspensions import task_approve, task_cancel, task_signal
from agents.models import AgentTask, Checkpoint, Suspension, TaskStatus
from agents.services import task_start
from agents_project.errors import Conflict
from audit.models import AuditEvent
from tests.helpers import WORK_QUEUE, broker, deliver, purge_queues
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)

SCRIPT = [
    {"think": "plan"},
    {"tool": "ledger.append", "args": {"key": "before", "value": 1}},
    {"approval": "go on?", "on_reject": "continue"},
    {"wait_event": "go"},
    {"wait": 0},
    {"fail": "flaky", "times": 1},
    {"tool": "ledger.append", "args": {"key": "after", "value": 2}},
    {"final": "done"},
]
LEDGER_STEPS = {2, 7}
MOVES = st.lists(
    st.sampled_from(
        [
            "deliver",
            "deliver",
            "deliver",
            "duplicate",
            "lose",
            "sweep",
            "approve",
            "reject",
            "signal",
            "signal_other",
            "cancel",
            "tick",
        ]
    ),
    max_size=40,
)


def check(task_id) -> None:
    task = AgentTask.objects.get(pk=task_id)
    assert task.status in TaskStatus.values
    trail = list(AuditEvent.objects.filter(task_id=task_id).order_by("seq"))
    assert [e.seq for e in trail] == list(range(1, len(trail) + 1))
    current = TaskStatus.PENDING
    for event in trail:
        if event.type == "transition":
            assert event.payload["from"] == current, "transitions chain"
            assert event.payload["to"] in TRANSITIONS[current], "only legal transitions"
            current = event.payload["to"]
    assert current == task.status
    steps = sorted(Checkpoint.objects.filter(task_id=task_id).values_list("step", flat=True))
    assert steps == list(range(task.current_step)), "one checkpoint per step, none skipped"
    committed = [e.step for e in trail if e.type == "step"]
    assert committed == list(range(1, task.current_step)), "each step committed once, in order"
    for key in LedgerEntry.objects.filter(task_id=task_id).values_list(
        "idempotency_key", flat=True
    ):
        step = int(key.split(":")[1])
        assert step in LEDGER_STEPS and step <= task.current_step


def move(name: str, task_id, queue, user) -> None:
    task = AgentTask.objects.get(pk=task_id)
    try:
        if name == "deliver":
            message = queue.get(no_ack=False)
            if message is not None:
                deliver(message)
        elif name == "duplicate":
            step_execute(task_id=task_id, step=max(task.current_step - 1, 1))
        elif name == "lose":
            message = queue.get(no_ack=False)
            if message is not None:
                message.ack()  # the message vanishes, as if the broker lost it
        elif name == "sweep":
            stuck_tasks_republish(actor="test")
        elif name in ("approve", "reject"):
            task_approve(task_id=task_id, user=user, approved=name == "approve")
        elif name == "signal":
            task_signal(task_id=task_id, user=user, name="go", payload={"n": 1})
        elif name == "signal_other":
            task_signal(task_id=task_id, user=user, name="noise", payload=None)
        elif name == "cancel":
            task_cancel(task_id=task_id, user=user)
        elif name == "tick":
            tick(actor="test")
    except Conflict:
        pass  # refused because of the task's state: a legitimate outcome


def finish(task_id, queue, user) -> None:
    """Drive the task to its end: answer its waits, recover lost steps, deliver."""
    for _ in range(200):
        task = AgentTask.objects.get(pk=task_id)
        if task.status in FINAL or task.status == TaskStatus.DEAD_LETTERED:
            return
        wait = Suspension.objects.filter(task_id=task_id, resolved_at__isnull=True).first()
        if task.status == TaskStatus.SUSPENDED and wait is not None:
            if wait.kind == "approval":
                task_approve(task_id=task_id, user=user, approved=True)
            elif wait.kind == "event":
                task_signal(task_id=task_id, user=user, name="go", payload=None)
            else:
                tick(actor="test")
            continue
        message = queue.get(no_ack=False)
        if message is not None:
            deliver(message)
        else:
            AgentTask.objects.filter(pk=task_id).update(retry_at=None)
            # A message the broker lost is still counted as queued: the operator's
            # recovery (``resume_stuck --include-queued``) publishes it again.
            stuck_tasks_republish(actor="test", include_queued=True)
        check(task_id)
    raise AssertionError("the task did not end")


@hsettings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(moves=MOVES)
def test_any_sequence_of_events_keeps_every_invariant(user, fast_retries, moves):
    purge_queues()
    task, _ = task_start(owner=user, agent="scripted", input={"script": SCRIPT})
    with broker() as conn:
        queue = WORK_QUEUE(conn.default_channel)
        for name in moves:
            move(name, task.pk, queue, user)
            check(task.pk)
        finish(task.pk, queue, user)
    check(task.pk)
    task.refresh_from_db()
    assert task.status in (TaskStatus.COMPLETED, TaskStatus.CANCELLED)
    if task.status == TaskStatus.COMPLETED:
        assert task.current_step == len(SCRIPT) + 1
        assert LedgerEntry.objects.filter(task=task).count() == len(LEDGER_STEPS)
