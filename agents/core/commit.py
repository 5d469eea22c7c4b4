"""Committing a step: its checkpoint, its audit events and the task's advance in one
transaction, fenced, with the next step published before the commit.

The engine (``agents.core.engine``) hands over the steps a delivery ran
(``StepRecord``, consecutive, all but the last a ``Continue``) and ``steps_commit``
writes them by one of two routes, which set the same columns (``advanced_values``):

- **the hot path** (PostgreSQL, the task only moves on: ``Continue`` or ``CallTools``):
  one statement advances the task, fenced, and inserts the checkpoints and the audit
  events sealed onto the chain head the delivery knows; ``BEGIN`` and the statement go
  out in psycopg's pipeline mode, the next step is published and confirmed while
  PostgreSQL runs them, then ``COMMIT`` and every answer come back together
  (``_advance_publishing``). A ``Finish`` or ``Fail`` of a running task that is no
  child and has none takes it too, in a transaction of its own (nothing to publish):
  the same statement also sets the final status the state machine gave
  (``_outcome_apply``, as on the general path), its ``transition`` event among the others;
- **the general path** (every outcome, every database, or when the hot path's statement
  matched nothing): lock the row, check the fence and the deadline, insert, move the
  status through the state machine, publish, commit.

The message is published before the commit, so no crash can lose it; a worker that
receives it first waits on the row lock (or, if it is faster still, on this delivery's
lease), and if the commit fails the message finds its step not current and is dropped.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import structlog
from django.db import connection, transaction
from psycopg.pq import TransactionStatus

from agents import metrics
from agents.core import children, clock, dispatch, suspensions
from agents.core.faults import fault_point
from agents.core.handoffs import handoff_message, queued_lease
from agents.core.leases import DeadlineReached, lease_release_values
from agents.core.results import StepResult
from agents.core.retries import safe_text, task_lock_if_current
from agents.core.state_machine import TRANSITION_FIELDS, transition
from agents.definition import (
    Agent,
    CallTools,
    Continue,
    Fail,
    Finish,
    Outcome,
    StartChildren,
    Suspend,
    ToolResult,
)
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents_project.errors import Backpressure
from audit.models import AuditEvent, EventType
from audit.services import AuditBatch, events_insert_sql, events_json, process_actor

logger = structlog.get_logger(__name__)


def worker_actor() -> str:
    """The audit actor of this worker process, ``worker:<host>:<pid>``: read per call,
    not at import, since pool processes are forked after this module is imported."""
    return process_actor("worker")


def advanced_values(
    *, next_step: int, agent: Agent, audit_seq: int, now: datetime
) -> dict[str, Any]:
    """The task row's columns a step's commit sets, and their values: the one list both
    routes write (the hot path's statement sets exactly these, the general path sets
    them on the model and saves them), plus the lease's release when the delivery ends
    (``RELEASE_FIELDS``) and ``result``, ``error`` and the status when the outcome ends
    or suspends the task. ``audit_seq``: the task's last audit event after this commit.
    The hot path also writes the chain head it leaves (``audit_head_seq``,
    ``audit_head_hash``, agents.0016); the general path does not, which only sends the
    next claim to the trail for it."""
    return {
        "current_step": next_step,
        "attempt": 0,
        "retry_at": None,
        "worker_losses": 0,
        "state_version": agent.state_version,
        # A compatible newer version that ran a step keeps the task from then on.
        "agent_version": agent.version,
        "audit_seq": audit_seq,
        "updated_at": now,
        "needs_state_version": None,
    }


_OUTCOME_NAMES = {
    Continue: "continue",
    CallTools: "call_tools",
    Suspend: "suspend",
    StartChildren: "start_children",
    Finish: "finish",
    Fail: "fail",
}


@dataclass
class ChainHead:
    """The task's audit chain head ``(seq, hash)`` as this delivery last knew it (from
    its claim, then from its own commits); None when unknown (read at the commit)."""

    head: tuple[int, str] | None
    # Whether the hot path already published the next step (True) or the broker
    # refused it (False) before its statement matched nothing; None: not tried.
    published: bool | None = None


@dataclass
class StepRecord:
    """One step that ran and passed its checks, waiting for its commit."""

    step: int
    state: Any
    outcome: Outcome
    results: list[ToolResult]
    events: list[tuple[str, dict[str, Any]]]
    duration_ms: float


def steps_commit(
    task_id: UUID,
    fence: int,
    agent: Agent,
    done: list[StepRecord],
    *,
    hand_on: bool,
    chain: ChainHead,
) -> StepResult:
    """Write the checkpoints and audit events of ``done`` (consecutive steps, all but the
    last a ``Continue``) in one transaction, fenced, and advance the task past them.

    ``hand_on``: this delivery ends here, so release the lease and publish the next step
    (inside the transaction). Otherwise the delivery goes on (a batch of steps, or a
    failure of the next step to record) and keeps its lease and its message.
    ``chain``: the task's last audit event as this delivery knows it (see
    ``AuditBatch``), updated by a commit on the hot path. Raises ``DeadlineReached`` if
    the deadline passed; ``STALE`` if the lease was lost.
    """
    last = done[-1].outcome
    if connection.vendor == "postgresql" and (
        not hand_on or isinstance(last, Continue | CallTools | Finish | Fail)
    ):
        result = _commit_advance(task_id, fence, agent, done, hand_on=hand_on, chain=chain)
        if result is not None:
            return result
    chain.head = None
    published, chain.published = chain.published, None
    return _commit_general(task_id, fence, agent, done, hand_on=hand_on, published=published)


def steps_commit_hand_off(
    task_id: UUID,
    fence: int,
    agent: Agent,
    done: list[StepRecord],
    *,
    chain: ChainHead,
    payload: dict[str, Any],
) -> StepResult | None:
    """Commit ``done`` (each a ``Continue`` or ``CallTools``) and hand off the step after
    them (``agents.core.handoffs``) in one transaction: the statement that advances the
    task also passes its lease to the hand-off queue, and the hand-off is published
    before the commit, once the statement has locked the row (the consumer's claim
    waits for this commit). ``COMMITTED`` when both happened. None, with nothing
    written and nothing published, where this route does not apply (not PostgreSQL,
    the lease lost, the deadline passed, another writer added audit events, the
    broker refused the hand-off): the caller then commits and hands off in two
    transactions (``steps_commit``, ``handoffs.step_hand_off``), which find out why."""
    if connection.vendor != "postgresql" or not isinstance(done[-1].outcome, Continue | CallTools):
        return None
    return _commit_advance(task_id, fence, agent, done, hand_on=True, chain=chain, hand_off=payload)


def _observations(record: StepRecord) -> dict[str, Any]:
    observations: dict[str, Any] = {}
    if record.results:
        observations["tool_results"] = [asdict(r) for r in record.results]
    if isinstance(record.outcome, Suspend | StartChildren):
        observations["suspended"] = True
    return observations


def _checkpoints_and_events(
    task: AgentTask, agent: Agent, done: list[StepRecord], audit: AuditBatch
) -> None:
    Checkpoint.objects.bulk_create(
        Checkpoint(
            task_id=task.pk,
            step=record.step,
            state=record.state,
            observations=_observations(record),
            schema_version=agent.state_version,
        )
        for record in done
    )
    _events_add(audit, done)


def _events_add(audit: AuditBatch, done: list[StepRecord]) -> None:
    for record in done:
        audit.add_all(record.events, step=record.step)
        audit.add(
            EventType.STEP,
            {"outcome": _OUTCOME_NAMES[type(record.outcome)], "duration_ms": record.duration_ms},
            step=record.step,
        )


def _committed(agent: Agent, done: list[StepRecord]) -> StepResult:
    fault_point("after_commit", step=done[-1].step)
    for record in done:
        metrics.step_committed(agent=agent.name, duration_ms=record.duration_ms)
    return StepResult.COMMITTED


def _commit_advance(
    task_id: UUID,
    fence: int,
    agent: Agent,
    done: list[StepRecord],
    *,
    hand_on: bool,
    chain: ChainHead,
    hand_off: dict[str, Any] | None = None,
) -> StepResult | None:
    """The hot path (PostgreSQL, the task only moves on): one statement advances the
    task, fenced, and inserts the checkpoints and the audit events, sealed onto the
    chain head this delivery knows; then the next step's publish (or, with
    ``hand_off``, its hand-off's) and the commit. None: not applicable (lease lost,
    deadline passed, or another writer added audit events meanwhile); nothing was
    written and the general path finds out which."""
    head = chain.head or _audit_head(task_id)
    task = AgentTask(
        id=task_id, agent_name=agent.name, current_step=done[-1].step + 1, audit_seq=head[0]
    )
    audit = AuditBatch(task, actor=worker_actor(), head=head)
    _events_add(audit, done)
    own = (
        hand_on
        and not dispatch.publishes_are_collected()
        and connection.get_autocommit()
        and not connection.in_atomic_block
    )
    last = done[-1].outcome
    ending = last if hand_on and isinstance(last, Finish | Fail) else None
    if not own or hand_off is not None or ending is not None:
        return _commit_advance_atomic(
            task, fence, agent, done, audit, head, hand_on, chain, hand_off=hand_off,
            ending=ending,
        )  # fmt: skip
    events = audit.seal(explicit_transaction=True)
    sql, params = _advance_statement(task, fence, agent, done, events, seq=head[0], hand_on=True)
    row, published = _advance_publishing(sql, params, task, agent)
    if row is None:
        chain.published = published
        return None
    chain.head = (events[-1].seq, events[-1].hash)
    return _committed(agent, done)


def _commit_advance_atomic(
    task: AgentTask,
    fence: int,
    agent: Agent,
    done: list[StepRecord],
    audit: AuditBatch,
    head: tuple[int, str],
    hand_on: bool,
    chain: ChainHead,
    *,
    hand_off: dict[str, Any] | None = None,
    ending: Finish | Fail | None = None,
) -> StepResult | None:
    """``_commit_advance`` in a Django transaction: a commit that keeps the delivery
    going (``hand_on`` False), one inside ``publishes_collected`` or inside the
    caller's ``atomic`` block, one that hands off the next step (``hand_off``, its
    payload), and one whose last step ends the task (``ending``; the statement then
    matches only a running task with no parent and no children, whose final-status
    hook has nothing to do: any other goes the general path). The statement's answer
    is read before anything is published, so a hand-off never reaches its consumer
    before the row it claims is locked (the consumer's claim then waits for this
    commit), and none goes out when the statement matched nothing. A hand-off the
    broker refuses rolls everything back (None)."""
    with transaction.atomic():
        if ending is not None:
            _ending_transition(task, done, ending, audit)
        events = audit.seal()
        handing_off = hand_off is not None
        sql, params = _advance_statement(
            task, fence, agent, done, events, seq=head[0], hand_on=hand_on, hand_off=handing_off,
            ending=task if ending is not None else None,
        )  # fmt: skip
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if row is None:
            transaction.set_rollback(True)  # nothing was written; forget the counters
            return None
        task.status = row[0]
        fault_point("before_commit", step=done[-1].step)
        if hand_off is not None:
            try:
                handoff_message(
                    task_id=task.pk, step=task.current_step, fence=fence, payload=hand_off
                )
            except Backpressure:
                transaction.set_rollback(True)
                return None
        elif hand_on and task.status == TaskStatus.RUNNING:
            # Inside ``publishes_collected``: the in-process runner takes it.
            dispatch.step_publish_in_commit(task=task, agent=agent)
        fault_point("after_publish", step=done[-1].step)
    chain.head = (events[-1].seq, events[-1].hash)
    return _committed(agent, done)


def _ending_transition(
    task: AgentTask, done: list[StepRecord], outcome: Finish | Fail, audit: AuditBatch
) -> None:
    """Apply ``outcome`` to the hot path's ``task`` as the general path applies it to its
    locked row (``_outcome_apply``: the result or the error, the final status through
    the state machine, its event on the step the row is at, ``done[0]``), ``task``
    standing for a running task with no parent and no children, which the statement
    checks. Inside the commit's transaction."""
    advanced = task.current_step
    task.status, task.parent_id, task.spawned = TaskStatus.RUNNING, None, 0
    task.current_step = done[0].step
    _outcome_apply(task, outcome, done[-1].step, audit)
    task.current_step = advanced


def _rollback_or_close() -> None:
    """End ``_advance_publishing``'s transaction after an error: ROLLBACK, and close the
    connection if that failed or left it in a transaction (Django believes it is in
    autocommit mode; its next use reconnects)."""
    with contextlib.suppress(Exception), connection.cursor() as control:
        control.execute("ROLLBACK")
    raw = connection.connection
    if raw is not None and raw.info.transaction_status != TransactionStatus.IDLE:
        with contextlib.suppress(Exception):
            connection.close()


def _advance_statement(
    task: AgentTask,
    fence: int,
    agent: Agent,
    done: list[StepRecord],
    events: list[AuditEvent],
    *,
    seq: int,
    hand_on: bool,
    hand_off: bool = False,
    ending: AgentTask | None = None,
) -> tuple[str, dict[str, Any]]:
    """``_ADVANCE_SQL`` and its parameters for ``done``, sealed ``events`` and the audit
    sequence ``seq`` the chain head had; ``hand_on`` also releases the lease, or with
    ``hand_off`` passes it to the hand-off queue (``agents.core.handoffs``); ``ending``:
    the task as ``_ending_transition`` left it, whose final status, times and result or
    error the statement also sets, on a running task with no parent and no children."""
    now = clock.now()
    values = advanced_values(
        next_step=done[-1].step + 1, agent=agent, audit_seq=task.audit_seq, now=now
    )
    if hand_off:
        queue, patience = queued_lease()
        values["lease_owner"] = queue
        values["lease_expires_at"] = now + timedelta(seconds=patience)
    conditions = ""
    if ending is not None:
        values.update({field: getattr(ending, field) for field in TRANSITION_FIELDS})
        conditions = "AND status = 'running' AND parent_id IS NULL AND spawned = 0"
    assignments = [f"{column} = %(set_{column})s" for column in values]
    if ending is not None:
        assignments.append(
            "result = %(set_result)s::jsonb"
            if ending.status == TaskStatus.COMPLETED
            else "error = %(set_error)s"
        )
    # The chain head these events leave, for the next step's claim (agents.0016).
    assignments += [
        "audit_head_seq = %(head_seq)s",
        "audit_head_hash = decode(%(head_hash)s, 'hex')",
    ]
    if hand_on and not hand_off:
        assignments += [
            "lease_owner = ''",
            "lease_expires_at = NULL",
            "in_flight = 0" if ending is not None
            else "in_flight = CASE WHEN status = 'running' THEN 1 ELSE 0 END",
        ]  # fmt: skip
    params: dict[str, Any] = {
        **{f"set_{column}": value for column, value in values.items()},
        "id": task.pk,
        "fence": fence,
        "first": done[0].step,
        "version": agent.state_version,
        "seq": seq,
        "head_seq": events[-1].seq,
        "head_hash": events[-1].hash,
        "now": now,
        "created": events[0].created_at,
        "checkpoints": json.dumps(
            [{"step": r.step, "state": r.state, "observations": _observations(r)} for r in done]
        ),
        "events": events_json(events),
    }
    if ending is not None:
        # As Django's JSONField stores it: None is SQL NULL.
        params["set_result"] = None if ending.result is None else json.dumps(ending.result)
        params["set_error"] = ending.error
    sql = _ADVANCE_SQL.format(assignments=",\n           ".join(assignments), conditions=conditions)
    return sql, params


def _advance_publishing(
    sql: str, params: dict[str, Any], task: AgentTask, agent: Agent
) -> tuple[tuple[Any, ...] | None, bool]:
    """Advance the task, publish its next step and commit, with one wait on PostgreSQL:
    ``BEGIN`` and the statement are sent in psycopg's pipeline mode without waiting
    for an answer; the message is published (and confirmed by the broker) while
    PostgreSQL runs them; then ``COMMIT`` is sent and every answer read at once.
    ``(row, published)``: the row as ``_ADVANCE_SQL`` returns it (None: it matched
    nothing, and the commit wrote nothing), and whether the broker took the message
    (False: ``Backpressure``; ``in_flight`` is set to 0 in the same transaction, for the
    stuck-task sweep). Any error rolls the transaction back and propagates.

    The transaction is this function's own (``BEGIN``/``COMMIT`` statements on a
    connection Django keeps in autocommit mode), because Django's ``atomic`` would wait
    for ``BEGIN``'s answer and again for the statement's before the commit. Not for use
    inside an ``atomic`` block.

    The statement is sent before the message (all of it, unless it is larger than the
    socket's buffer), so the next step's delivery nearly always finds the row locked
    and waits for this commit; one that comes first anyway waits for this delivery's
    lease, and gives its message back rather than drop it if it cannot tell
    (``agents.core.leases._wait_for_publisher``). If the statement matched nothing, the
    message is out: the general path then counts it and does not publish again
    (``ChainHead.published``), or the delivery that gets it finds its step not current and
    drops it. psycopg's pipeline mode:
    https://www.psycopg.org/psycopg3/docs/advanced/pipeline.html
    """
    fault_point("before_commit", step=task.current_step - 1)
    # Before the pipeline: it may read the learned limits from the database.
    limits = dispatch.step_time_limits(agent)
    published = False
    try:
        with connection.cursor() as control, connection.cursor() as cursor:
            # The pipeline's own errors (its Sync at the exit, on a broken connection)
            # are psycopg's: map them to Django's, as its cursor does, so a database
            # outage is waited out like any other (``step_execute``).
            with connection.wrap_database_errors, connection.connection.pipeline():
                control.execute("BEGIN")
                cursor.execute(sql, params)
                try:
                    dispatch.step_publish(
                        task_id=task.pk, step=task.current_step, agent=agent, limits=limits
                    )
                    published = True
                except Backpressure:
                    # Left to the stuck-task sweep, if the statement advanced the task.
                    control.execute(
                        f"UPDATE {AgentTask._meta.db_table} SET in_flight = 0"
                        " WHERE id = %s AND current_step = %s AND fence = %s",
                        [task.pk, task.current_step, params["fence"]],
                    )
                fault_point("after_publish", step=task.current_step - 1)
                control.execute("COMMIT")
            row = cursor.fetchone()
    except BaseException:
        _rollback_or_close()
        raise
    if not published:
        logger.error("step not published; the stuck-task sweep will publish it")
    return row, published


# Advance the task (fenced; only if no other writer added audit events since ``seq``)
# and insert the checkpoints and the sealed events, in one statement: the INSERTs read
# the UPDATE's row, so they write nothing when it matched nothing.
_ADVANCE_SQL = f"""
WITH advanced AS (
    UPDATE {AgentTask._meta.db_table}
       SET {{assignments}}
     WHERE id = %(id)s AND fence = %(fence)s AND current_step = %(first)s
       AND audit_seq = %(seq)s AND (deadline IS NULL OR deadline > %(now)s) {{conditions}}
 RETURNING status
), checkpoints AS (
    INSERT INTO {Checkpoint._meta.db_table}
           (task_id, step, state, observations, schema_version, created_at)
    SELECT %(id)s, c.step, c.state, c.observations, %(version)s, %(created)s
      FROM advanced,
           jsonb_to_recordset(%(checkpoints)s::jsonb)
               AS c(step integer, state jsonb, observations jsonb)
), events AS ({events_insert_sql("advanced")}
)
SELECT status FROM advanced
"""


def _audit_head(task_id: UUID) -> tuple[int, str]:
    """``(audit_seq, hash of that event)`` of the task, read now ("" before any event;
    the hash as hex, as ``DigestField`` reads it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT t.audit_seq, (SELECT a.hash FROM {AuditEvent._meta.db_table} AS a"
            "  WHERE a.task_id = t.id AND a.seq = t.audit_seq)"
            f" FROM {AgentTask._meta.db_table} AS t WHERE t.id = %s",
            [task_id],
        )
        row = cursor.fetchone()
    if not row:
        return (0, "")
    return row[0], AuditEvent._meta.get_field("hash").to_python(row[1])


def _commit_general(
    task_id: UUID,
    fence: int,
    agent: Agent,
    done: list[StepRecord],
    *,
    hand_on: bool,
    published: bool | None = None,
) -> StepResult:
    """Every outcome, on every database: lock the row, check, write, transition.
    ``published``: the hot path already published the next step (True) or the broker
    refused it (False); None: publish here if the task goes on."""
    outcome = done[-1].outcome
    step = done[-1].step
    with transaction.atomic():
        task = task_lock_if_current(task_id=task_id, step=done[0].step, fence=fence, statuses=None)
        if task is None:
            logger.info("lease lost before the commit; result dropped")
            return StepResult.STALE
        now = clock.now()
        if task.deadline is not None and task.deadline <= now:
            raise DeadlineReached(f"deadline {task.deadline.isoformat()} passed")
        audit = AuditBatch(task, actor=worker_actor())
        _checkpoints_and_events(task, agent, done, audit)
        # A delivery that goes on (``hand_on`` False) only advances: its steps continue.
        publish_next, fields = (
            _outcome_apply(task, outcome, step, audit) if hand_on else (False, [])
        )
        audit.flush()
        values = advanced_values(next_step=step + 1, agent=agent, audit_seq=task.audit_seq, now=now)
        if hand_on:
            values.update(lease_release_values(), in_flight=1 if publish_next else 0)
        for name, value in values.items():
            setattr(task, name, value)
        task.save(update_fields=[*values, *fields])
        fault_point("before_commit", step=step)
        if publish_next and published is None:
            dispatch.step_publish_in_commit(task=task, agent=agent)
        elif publish_next and not published:
            dispatch.step_unpublished(task=task)
        fault_point("after_publish", step=step)
    return _committed(agent, done)


def _outcome_apply(
    task: AgentTask, outcome: Outcome, step: int, audit: AuditBatch
) -> tuple[bool, list[str]]:
    """What the last step's outcome does to the locked task, for a delivery that ends:
    ``(publish the next step?, fields changed besides the advance)``."""
    if task.status != TaskStatus.RUNNING:
        # Cancelled or timed out while the step ran: keep its work, start nothing new.
        logger.info("step recorded after the task stopped", status=task.status)
        return False, []
    if isinstance(outcome, Continue | CallTools):
        return True, []
    if isinstance(outcome, Finish):
        task.result = outcome.result
        transition(task, TaskStatus.COMPLETED, audit=audit)
        return False, ["result", *TRANSITION_FIELDS]
    if isinstance(outcome, Fail):
        task.error = safe_text(outcome.error)
        transition(task, TaskStatus.FAILED, audit=audit, reason=task.error)
        return False, ["error", *TRANSITION_FIELDS]
    if isinstance(outcome, StartChildren):
        children.children_spawn(parent=task, step=step, outcome=outcome, audit=audit)
        return False, ["spawned", *TRANSITION_FIELDS]
    assert isinstance(outcome, Suspend)
    publish = suspensions.suspension_open(task=task, step=step, outcome=outcome, audit=audit)
    return publish, list(TRANSITION_FIELDS)
