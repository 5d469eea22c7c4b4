"""The SQL statements of one ordinary step, counted: a regression in the hot path shows
up here as a failing count, not as a timing."""

from __future__ import annotations

import threading
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from agents.core import clock, commit, dispatch, engine, leases
from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.definition import Agent, Continue, Fail, Outcome, StepContext, register
from agents.models import AgentTask
from agents.services import task_start
from audit.models import AuditEvent, EventType
from audit.services import AuditBatch

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_ordinary_step_costs_four_statements(user):
    script = [{"think": "a"}, {"think": "b"}, {"think": "c"}, {"final": 1}]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED  # input cached
    clock.now()  # the clock's offset is measured at most every 10 s, not per step
    with CaptureQueriesContext(connection) as queries:
        assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    # Claim the lease and read the checkpoint and the audit chain's head (one UPDATE ...
    # RETURNING); then one transaction of one statement: advance the task, insert the
    # checkpoint and the audit events (sealed onto the head the claim read).
    assert statements == ["UPDATE", "BEGIN", "WITH", "COMMIT"], statements


@register
class _FailsAtItsSecondStep(Agent):
    """Thinks, then ends its task with ``Fail`` (an outcome, not an exception)."""

    name = "fails-at-its-second-step-for-tests"

    def initial_state(self, input: Any) -> Any:
        return {}

    def step(self, ctx: StepContext) -> Outcome:
        if ctx.step == 1:
            return Continue(state={"thought": True})
        return Fail(error="no", state=ctx.state)


@pytest.mark.parametrize(
    ("agent", "status", "result", "error"),
    [("scripted", "completed", {"n": 1}, ""), (_FailsAtItsSecondStep.name, "failed", None, "no")],
)
def test_a_step_that_ends_its_task_costs_one_statement_and_writes_what_the_general_path_did(
    user, agent, status, result, error
):
    script = [{"think": "a"}, {"final": {"n": 1}}]
    task, _ = task_start(owner=user, agent=agent, input={"script": script})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    with CaptureQueriesContext(connection) as queries:
        assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    # The claim, then one statement sets the final status, the result or the error, the
    # checkpoint and the events (the general path took five: lock, checkpoint, chain
    # head, events, row).
    assert statements == ["UPDATE", "BEGIN", "WITH", "COMMIT"], statements
    task.refresh_from_db()
    assert (task.status, task.result, task.error) == (status, result, error)
    assert task.finished_at is not None and task.finished_at == task.status_changed_at
    assert (task.lease_owner, task.lease_expires_at, task.in_flight) == ("", None, 0)
    assert task.current_step == 3
    events = list(AuditEvent.objects.filter(task=task, step=2).order_by("seq"))
    assert [e.type for e in events][-2:] == ["step", "transition"]
    assert events[-1].payload["to"] == status
    out = StringIO()
    call_command("audit_verify", str(task.pk), stdout=out)
    assert "intact" in out.getvalue(), out.getvalue()


def _racer(task_id: object, step: int, raced: dict[str, object]) -> threading.Thread:
    """A thread that delivers ``step`` of the task, as another worker would, and notes
    its result and the statements it ran."""

    def deliver() -> None:
        try:
            with CaptureQueriesContext(connections["default"]) as queries:
                raced["result"] = step_execute(task_id=task_id, step=step)  # type: ignore[arg-type]
            raced["statements"] = [q["sql"].split()[0].upper() for q in queries.captured_queries]
        finally:
            connections["default"].close()

    return threading.Thread(target=deliver)


def _step_one_done_and_a_racer(user: object) -> tuple[Any, threading.Thread, dict[str, object]]:
    """A four-step task whose step 1 committed, and an unstarted ``_racer`` for its
    step 3 with the dict it notes into."""
    script = [{"think": "a"}, {"think": "b"}, {"think": "c"}, {"final": 1}]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    raced: dict[str, object] = {}
    return task, _racer(task.pk, 3, raced), raced


def _poll(other: object, sql: str, params: list[object], what: str) -> None:
    """Run ``sql`` on another connection until it returns true, for at most 5 s."""
    for _ in range(500):
        with other.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(sql, params)
            if cursor.fetchone()[0]:
                return
        time.sleep(0.01)
    raise AssertionError(what)


def test_a_delivery_that_arrives_before_the_commit_waits_for_it(user, monkeypatch):
    """The next step's message is published while the commit of the step before is
    open, so it often arrives first: its claim waits for that commit on the row lock and
    still costs one statement, which reads the checkpoint that commit wrote
    (``agents_step_before``: its own snapshot sees it). It used to miss the row and take
    the general path: four more reads and a write."""
    task, racer, raced = _step_one_done_and_a_racer(user)
    publish = dispatch.step_publish
    other = connections.create_connection("default")

    def publish_then_race(**kwargs: object) -> None:
        publish(**kwargs)  # type: ignore[arg-type]
        if kwargs["step"] != 3:
            return
        # The commit's statement has locked the row (its transaction has an id), then
        # the racing claim waits for that lock; only then does the commit go on.
        pid = connection.connection.info.backend_pid
        _poll(
            other,
            "SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = %s",
            [pid],
            "the commit's statement never ran",
        )
        racer.start()
        _poll(
            other,
            "SELECT count(*) > 0 FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()",
            [],
            "the racing claim never waited for the row lock",
        )

    monkeypatch.setattr(dispatch, "step_publish", publish_then_race)
    try:
        assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    finally:
        other.close()
    racer.join(30)
    assert raced["result"] == StepResult.COMMITTED
    assert raced["statements"] == ["UPDATE", "BEGIN", "WITH", "COMMIT"], raced


def test_a_delivery_that_arrives_before_the_commit_locks_the_row_waits_for_it(user, monkeypatch):
    """The commit's statement is sent just before the next step's publish, so a
    delivery can, rarely, find the task still one step behind and its row not locked
    yet. It waits for the live copy holding the lease to commit (or to give up), rather
    than dropping its message as stale, which would leave the task with no message."""
    task, racer, raced = _step_one_done_and_a_racer(user)
    waiting = threading.Event()
    watch = leases._wait_for_publisher

    def watch_noted(*args: object, **kwargs: object) -> bool:
        waiting.set()
        return watch(*args, **kwargs)  # type: ignore[arg-type]

    advance = commit._advance_publishing

    def race_then_advance(*args: object, **kwargs: object) -> object:
        if threading.current_thread() is not racer:
            racer.start()
            assert waiting.wait(10), "the early delivery did not wait for the lease's holder"
        return advance(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(leases, "_wait_for_publisher", watch_noted)
    monkeypatch.setattr(commit, "_advance_publishing", race_then_advance)
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    racer.join(30)
    assert raced["result"] == StepResult.COMMITTED
    task.refresh_from_db()
    assert task.current_step == 4


def test_an_early_delivery_that_cannot_tell_gives_its_message_back(user, monkeypatch, settings):
    """If the lease's holder neither commits nor ends its delivery within ``LEASE_TTL``,
    the early delivery gives its message back to the queue instead of dropping it: the
    holder's commit may still land, and then that message is the step's only one."""
    settings.AGENTS = {**settings.AGENTS, "LEASE_TTL": 1.0}
    task, racer, raced = _step_one_done_and_a_racer(user)
    advance = commit._advance_publishing

    def stall_then_advance(*args: object, **kwargs: object) -> object:
        if threading.current_thread() is not racer:
            racer.start()
            racer.join(30)  # the commit stalls until the early delivery has decided
        return advance(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(commit, "_advance_publishing", stall_then_advance)
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    assert raced["result"] == StepResult.REQUEUE
    task.refresh_from_db()
    assert task.current_step == 3


def test_an_audit_event_written_while_the_step_ran_keeps_the_chain_whole(user, monkeypatch):
    """The hot path seals the step's events onto the chain head its claim read; if
    another writer appended an event meanwhile, its statement matches nothing and the
    general path commits the step on the real head."""
    script = [{"think": "a"}, {"think": "b"}, {"final": 1}]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    step_once = engine._step_once

    def step_then_note(*args: object, **kwargs: object) -> object:
        record = step_once(*args, **kwargs)  # type: ignore[arg-type]
        with transaction.atomic():
            locked = AgentTask.objects.select_for_update().get(pk=task.pk)
            audit = AuditBatch(locked, actor="test")
            audit.add(EventType.REASONING, {"text": "written beside the step"})
            audit.flush()
            locked.save(update_fields=["audit_seq"])
        return record

    monkeypatch.setattr(engine, "_step_once", step_then_note)
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    monkeypatch.undo()
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    trail = list(AuditEvent.objects.filter(task=task).order_by("seq"))
    assert [e.seq for e in trail] == list(range(1, len(trail) + 1))
    assert all(len(e.hash) == 64 for e in trail)
    assert "written beside the step" in [e.payload.get("text") for e in trail]
    out = StringIO()
    call_command("audit_verify", str(task.pk), stdout=out, stderr=out)
    assert "intact" in out.getvalue()


def test_an_ordinary_step_updates_its_task_without_touching_an_index(user):
    """Both writes of a step to its task row (the claim, the advance) are HOT updates:
    no index holds a column a step changes, so PostgreSQL writes no index entries for
    them. A new index on such a column (updated_at was one) shows up here."""
    script = [{"think": "a"}, {"think": "b"}, {"think": "c"}, {"final": 1}]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED

    def updates() -> tuple[int, int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_force_next_flush()")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = %s",
                [AgentTask._meta.db_table],
            )
            return cursor.fetchone()

    before = updates()
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    after = updates()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


def _trail_scans() -> int:
    """Index and table scans of the audit trail's partitions so far (their statistics)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT coalesce(sum(coalesce(idx_scan, 0) + seq_scan), 0) FROM pg_stat_user_tables"
            " WHERE relname LIKE %s",
            [f"{AuditEvent._meta.db_table}%"],
        )
        return int(cursor.fetchone()[0])


def test_a_new_task_carries_its_chain_head_so_its_first_claim_reads_no_partition(user):
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})
    task.refresh_from_db()
    created = AuditEvent.objects.get(task=task)
    assert (
        (task.audit_head_seq, task.audit_head_hash)
        == (1, created.hash)
        == (
            task.audit_seq,
            created.hash,
        )
    )
    before = _trail_scans()
    claim = leases._claim_free_lease(task.pk, 1, leases.lease_owner_name("test"))
    assert claim is not None and claim.audit_head == (1, created.hash)
    assert _trail_scans() == before


def test_a_claim_reads_the_chain_head_on_the_task_row_not_in_the_trail(user):
    """The trail is partitioned by month and a head's lookup by (task, seq) names no
    month, so it would open every partition: the hot path keeps the head it writes on
    the task row (agents.0016), and the next claim reads it there. Once another writer
    appends an event, the row's head is stale and the claim reads the trail instead."""
    script = [{"think": "a"}, {"think": "b"}, {"think": "c"}, {"final": 1}]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    task.refresh_from_db()
    last = AuditEvent.objects.filter(task=task).order_by("-seq").first()
    assert (task.audit_head_seq, task.audit_head_hash) == (task.audit_seq, last.hash)

    before = _trail_scans()
    claim = leases._claim_free_lease(task.pk, 2, leases.lease_owner_name("test"))
    assert claim is not None and claim.audit_head == (last.seq, last.hash)
    assert _trail_scans() == before

    with transaction.atomic():
        locked = AgentTask.objects.select_for_update().get(pk=task.pk)
        audit = AuditBatch(locked, actor="test")
        audit.add(EventType.REASONING, {"text": "written beside the steps"})
        audit.flush()
        locked.save(update_fields=["audit_seq"])
    AgentTask.objects.filter(pk=task.pk).update(lease_owner="", lease_expires_at=None)
    newest = AuditEvent.objects.filter(task=task).order_by("-seq").first()
    claim = leases._claim_free_lease(task.pk, 2, leases.lease_owner_name("test"))
    assert claim is not None and claim.audit_head == (newest.seq, newest.hash)
    assert _trail_scans() > before
