"""The step engine: run one step of one task, durably, as its only live copy.

A delivery of ``(task id, step)`` goes through:

1. the claim (``agents.core.leases``): one read of the task and the previous step's
   checkpoint, then the lease, taken with a compare-and-swap on the fencing token. A
   delivery for a step that is not current, a duplicate of a step a live copy holds,
   or an early copy of a step waiting out its backoff is dropped here;
2. the deadline and, when this delivery took over the lease of a holder that died,
   the count of lost workers: either may end the task here;
3. the checkpoint of the previous step, migrated if older code wrote it; a step this
   worker cannot run (agent unknown, checkpoint newer than its code, the task pinned
   to another version of the agent: ``agents.core.versions``) is refused and parked
   until a worker that can run it sweeps it;
4. the agent's ``step``, then the tools it asked for, each with the idempotency key
   ``task id : step : call index``; no database transaction is open meanwhile, a
   heartbeat renews the lease, and an alarm stops the step at the task's deadline;
5. the outcome is checked (every value JSON that PostgreSQL accepts) before anything
   is written;
6. one transaction: lock the task row, check the fence and the deadline, insert the
   checkpoint and every audit event, advance the task (its status only through the
   state machine), publish the next step, commit. The message is published before the
   commit, so no crash can lose it; a worker that receives it first waits on the row
   lock (or, if it is faster still, on this delivery's lease), and if the commit fails
   the message finds its step not current and is dropped (unless this delivery, after
   a database outage, commits the step after all: then it runs the next step). On the
   hot path the statement and the publish overlap (``_advance_publishing``).

Anything raised at any of these points is a step error: audited, counted as an
attempt, and retried, failed or dead-lettered by one policy (``agents.core.retries``).
A database outage is not a step error: the step waits for the database, holding its
message, and gives the message back if the outage outlasts ``AGENTS_DATABASE_PATIENCE``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, connections, transaction
from django.db.models import TextField
from django.db.models.functions import Cast
from psycopg.pq import TransactionStatus

from agents import scheduling
from agents.core import clock, dispatch
from agents.core.faults import fault_point
from agents.core.leases import (
    RELEASE_FIELDS,
    Claim,
    DeadlineReached,
    Verdict,
    deadline_alarm,
    lease_claim,
    lease_held,
    lease_owner_name,
    lease_release_later,
    lease_release_values,
)
from agents.core.results import StepResult
from agents.core.retries import (
    retry_or_dead_letter,
    safe_text,
    schedule_retry,
    step_fail,
    step_refuse,
    task_lock_if_current,
    worker_loss_record,
)
from agents.definition import (
    Agent,
    CallTools,
    Continue,
    Fail,
    Finish,
    Outcome,
    Resumption,
    StepContext,
    Suspend,
    ToolResult,
    registered_agents,
)
from agents.errors import PermanentError, RetryLater
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.state_machine import TRANSITION_FIELDS, transition
from agents.validation import json_path_check
from agents_project import metrics
from agents_project.errors import Backpressure
from audit.models import AuditEvent, EventType
from audit.services import AuditBatch, process_actor
from tools.runner import ToolRun, tools_run

logger = structlog.get_logger(__name__)

DATABASE_ERRORS = (OperationalError, InterfaceError)

# Fields the commit of a step changes on the task row (plus result, error and status
# when the outcome ends or suspends the task).
_ADVANCE_FIELDS = (
    "current_step",
    "attempt",
    "retry_at",
    "worker_losses",
    "state_version",
    "agent_version",
    "audit_seq",
    "updated_at",
    "lease_owner",
    "lease_expires_at",
    "in_flight",
    "needs_state_version",
)

_OUTCOME_NAMES = {
    Continue: "continue",
    CallTools: "call_tools",
    Suspend: "suspend",
    Finish: "finish",
    Fail: "fail",
}


def _actor() -> str:
    # Per call, not at import: pool processes are forked after this module is imported.
    return process_actor("worker")


def step_execute(
    *,
    task_id: UUID,
    step: int,
    message: Mapping[str, Any] | None = None,
    node: str = "local",
    published_at: float | None = None,
) -> StepResult:
    """Run ``step`` of the task once, as its only live copy. Safe to call any number of
    times, concurrently, for the same step: at most one call runs the agent's code at a
    time, and only a call that holds the lease commits.

    ``node`` is the Celery node name of the calling worker (for ``leases_hand_back``);
    ``published_at`` the time (``time.time()``) its message was published, for the
    time-in-queue metric.
    Retries are scheduled in the database (``agents.core.retries``), not by raising. A
    ``DEAD_LETTERED`` result tells the Celery task to reject its message into the
    dead-letter queue; ``REQUEUE`` to give it back (the database stayed away longer
    than ``AGENTS_DATABASE_PATIENCE`` seconds).
    """
    owner = lease_owner_name(node)
    with structlog.contextvars.bound_contextvars(task_id=str(task_id), step=step):
        waited, delay = 0.0, 0.5
        while True:
            try:
                return _execute(task_id, step, dict(message or {}), owner, published_at)
            except DATABASE_ERRORS as exc:
                # The database is restarting or unreachable. Nothing can progress without
                # it, so this step holds its message and waits, rather than failing a
                # task over an outage. Running the claim again is safe: this delivery
                # owns its lease under ``owner`` and takes it back.
                if waited >= settings.AGENTS["DATABASE_PATIENCE"]:
                    logger.error("database unavailable too long; message given back")
                    # Its redelivery must not be taken for a death: release the lease
                    # as soon as the database answers again.
                    lease_release_later(task_id=task_id, owner=owner)
                    return StepResult.REQUEUE
                logger.warning("database unavailable; the step waits", error=repr(exc))
                with contextlib.suppress(*DATABASE_ERRORS):
                    connections.close_all()
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)


_DROPPED = {
    Verdict.STALE: "stale delivery dropped",
    Verdict.DUPLICATE: "duplicate delivery dropped; a live copy holds the step",
    Verdict.EARLY: "early delivery dropped; a retry is pending",
    Verdict.UNKNOWN: "delivery for an unknown task dropped",
}


def _execute(
    task_id: UUID, step: int, message: dict[str, Any], owner: str, published_at: float | None
) -> StepResult:
    claim = lease_claim(task_id=task_id, step=step, owner=owner)
    if claim.verdict in _DROPPED:
        logger.info(_DROPPED[claim.verdict])
        return StepResult.STALE
    if claim.verdict == Verdict.UNDECIDED:
        logger.info("early delivery given back; the step before it may still commit")
        return StepResult.REQUEUE
    if claim.verdict == Verdict.OVERDUE:
        scheduling.task_time_out(task_id=task_id, actor=_actor())
        return StepResult.TIMED_OUT
    task, fence = claim.task, claim.fence
    assert task is not None
    if claim.took_over and worker_loss_record(
        task_id=task_id, step=step, fence=fence, message=message, actor=_actor()
    ):
        return StepResult.DEAD_LETTERED
    agent = registered_agents().get(task.agent_name)
    if agent is None:
        step_refuse(
            task_id=task_id,
            step=step,
            fence=fence,
            needs_state_version=0,
            reason=f"agent {task.agent_name!r} is not registered in this worker",
            actor=_actor(),
        )
        return StepResult.REFUSED
    with lease_held(task_id=task_id, fence=fence, owner=owner):
        try:
            return _run(claim, agent, step, message, published_at)
        except DeadlineReached:
            scheduling.task_time_out(task_id=task_id, actor=_actor())
            return StepResult.TIMED_OUT
        except DATABASE_ERRORS:
            raise
        except Exception as exc:
            # Anything raised outside the agent's own code (loading, migrating,
            # checking, committing) is a failed attempt like any other.
            logger.warning("step failed outside the agent's code", error=repr(exc))
            metrics.step_failed(agent=agent.name, events=[])
            return retry_or_dead_letter(
                task_id=task_id,
                step=task.current_step,
                fence=fence,
                agent=agent,
                error=exc,
                events=[],
                message=message,
                actor=_actor(),
            )


def _run(
    claim: Claim, agent: Agent, step: int, message: dict[str, Any], published_at: float | None
) -> StepResult:
    task, checkpoint, fence = claim.task, claim.checkpoint, claim.fence
    assert task is not None
    task_id = task.pk
    if checkpoint is None:
        raise PermanentError(f"task {task_id} has no checkpoint {step - 1}")
    # Checkpoint 0 of schema version 0: the process that accepted the task runs another
    # version of the agent than the task's (``agents.core.versions``), so the worker of
    # the task's version computes the ``initial_state`` of the input itself.
    fresh = checkpoint.step == 0 and checkpoint.schema_version == 0
    if checkpoint.schema_version > agent.state_version:
        step_refuse(
            task_id=task_id,
            step=step,
            fence=fence,
            needs_state_version=checkpoint.schema_version,
            reason=(
                f"checkpoint {step - 1} has state schema version {checkpoint.schema_version};"
                f" this worker's {agent.name} knows up to {agent.state_version}. The task is "
                "left untouched until a worker with newer code takes it."
            ),
            actor=_actor(),
        )
        return StepResult.REFUSED
    if not agent.runs_version(task.agent_version):
        # Pinned to another version of the agent (``agents.core.versions``): park the
        # step untouched; the sweep of a worker that serves the version publishes it.
        step_refuse(
            task_id=task_id,
            step=step,
            fence=fence,
            needs_state_version=0,
            reason=(
                f"the task runs {agent.name} version {task.agent_version}; this worker "
                f"serves version {agent.version}. The step waits for a worker of its version."
            ),
            actor=_actor(),
        )
        return StepResult.REFUSED
    if task.status == TaskStatus.PENDING and not scheduling.task_begin(
        task_id=task_id, actor=_actor()
    ):
        return StepResult.STALE
    if published_at is not None and not claim.took_over:
        # Publish to start, for agents_step_queue_seconds (a take-over's time includes
        # the copy that died, so it is left out).
        metrics.step_started(agent=agent.name, queued_seconds=time.time() - published_at)

    events: list[tuple[str, dict[str, Any]]] = []
    if fresh:
        state = agent.initial_state(_task_input(task_id))
    else:
        state = _migrate(agent, checkpoint, events)
    ctx = StepContext(
        task_id=task_id,
        step=step,
        attempt=task.attempt + 1,
        input=_task_input(task_id),
        state=state,
        tool_results=tuple(
            ToolResult(**r) for r in checkpoint.observations.get("tool_results", ())
        ),
        resumed=_resumption(task_id, step - 1, checkpoint),
        events=events,
    )
    per_delivery, commit_every = checkpoint_policy(agent)
    # The audit chain's head as the claim read it, then as each commit left it.
    chain = _Chain(claim.audit_head)
    done: list[_Done] = []
    while True:
        try:
            record = _step_once(agent, ctx, task.owner_id, task.deadline, events)
        except DeadlineReached:
            if done:
                _commit_part(task, fence, agent, done, chain)
            raise
        except Exception as exc:
            # The steps of this delivery before this one succeeded: keep them first.
            if done and _commit_part(task, fence, agent, done, chain) != StepResult.COMMITTED:
                return StepResult.STALE
            return _step_failed(task_id, ctx.step, fence, agent, exc, events, message)
        done.append(record)
        if not (isinstance(record.outcome, Continue) and ctx.step - step + 1 < per_delivery):
            return _commit(task_id, fence, agent, done, hand_on=True, chain=chain)
        if len(done) >= commit_every:
            if _commit_part(task, fence, agent, done, chain) != StepResult.COMMITTED:
                return StepResult.STALE
            done = []
        events = []
        ctx = StepContext(
            task_id=task_id,
            step=ctx.step + 1,
            attempt=1,
            input=_task_input(task_id),
            state=record.state,
            events=events,
        )


def _commit_part(
    task: AgentTask, fence: int, agent: Agent, done: list[_Done], chain: _Chain
) -> StepResult:
    """Commit some steps of a delivery that goes on (keeping its lease and message), and
    note on ``task`` where it now is, for a failure recorded later."""
    result = _commit(task.pk, fence, agent, done, hand_on=False, chain=chain)
    if result == StepResult.COMMITTED:
        task.current_step = done[-1].step + 1
    return result


def checkpoint_policy(agent: Agent) -> tuple[int, int]:
    """``(steps_per_delivery, commit_every)`` for ``agent``: its class attributes, or
    ``AGENTS_CHECKPOINT_POLICY[agent.name]``. Both at least 1; ``commit_every`` at most
    ``steps_per_delivery``."""
    override = settings.AGENTS["CHECKPOINT_POLICY"].get(agent.name, {})
    per_delivery = max(int(override.get("steps_per_delivery", agent.steps_per_delivery)), 1)
    commit_every = max(int(override.get("commit_every", agent.commit_every)), 1)
    return per_delivery, min(commit_every, per_delivery)


@dataclass
class _Chain:
    """The task's audit chain head ``(seq, hash)`` as this delivery last knew it (from
    its claim, then from its own commits); None when unknown (read at the commit)."""

    head: tuple[int, str] | None
    # Whether the hot path already published the next step (True) or the broker
    # refused it (False) before its statement matched nothing; None: not tried.
    published: bool | None = None


@dataclass
class _Done:
    """One step that ran and passed its checks, waiting for its commit."""

    step: int
    state: Any
    outcome: Outcome
    results: list[ToolResult]
    events: list[tuple[str, dict[str, Any]]]
    duration_ms: float


def _step_once(
    agent: Agent,
    ctx: StepContext,
    owner_id: int,
    deadline: Any,
    events: list[tuple[str, dict[str, Any]]],
) -> _Done:
    """Run the agent's step and its tools, and check the outcome can be stored."""
    started = time.monotonic()
    tool_run = ToolRun(
        task_id=ctx.task_id,
        owner_id=owner_id,
        step=ctx.step,
        events=events,
        errors_as_results=agent.tool_errors_to_agent,
    )
    with deadline_alarm(deadline):
        outcome = agent.step(ctx)
        if not isinstance(outcome, Continue | CallTools | Suspend | Finish | Fail):
            raise PermanentError(f"{agent.name}.step returned {outcome!r}, not an outcome")
        if outcome.reasoning:
            events.append((EventType.REASONING, {"text": outcome.reasoning}))
        results = tools_run(tool_run, outcome.calls) if isinstance(outcome, CallTools) else []
        _check_storable(outcome, ctx.state, results, events)
    new_state = ctx.state if outcome.state is None else outcome.state
    duration_ms = round((time.monotonic() - started) * 1000, 3)
    return _Done(ctx.step, new_state, outcome, results, events, duration_ms)


def _step_failed(
    task_id: UUID,
    step: int,
    fence: int,
    agent: Agent,
    exc: Exception,
    events: list[tuple[str, dict[str, Any]]],
    message: dict[str, Any],
) -> StepResult:
    """Classify a failed step by its error's type (``agents.errors``)."""
    if isinstance(exc, RetryLater):
        return schedule_retry(
            task_id=task_id,
            step=step,
            fence=fence,
            error=exc,
            delay=exc.delay,
            events=events,
            actor=_actor(),
        )
    metrics.step_failed(agent=agent.name, events=events)
    if isinstance(exc, PermanentError):
        return step_fail(
            task_id=task_id, step=step, fence=fence, error=exc, events=events, actor=_actor()
        )
    logger.warning("step attempt failed", error=repr(exc))
    return retry_or_dead_letter(
        task_id=task_id,
        step=step,
        fence=fence,
        agent=agent,
        error=exc,
        events=events,
        message=message,
        actor=_actor(),
    )


def _check_storable(
    outcome: Outcome,
    state: Any,
    results: list[ToolResult],
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    """Refuse, before the commit, what PostgreSQL would refuse inside it (NaN, a set,
    a NUL character, an unpaired surrogate), naming where it is. The same check as the
    API's (``agents.validation``); raises ``PermanentError``."""
    if outcome.state is not None:
        json_path_check(outcome.state, path="state")
    else:
        json_path_check(state, path="state")
    for index, result in enumerate(results):
        json_path_check(result.value, path=f"tool_results[{index}].value")
        json_path_check(result.error, path=f"tool_results[{index}].error")
    if isinstance(outcome, Finish):
        json_path_check(outcome.result, path="result")
    if isinstance(outcome, Fail):
        json_path_check(outcome.error, path="error")
    if isinstance(outcome, Suspend):
        json_path_check(outcome.default, path="default")
    for index, (event_type, payload) in enumerate(events):
        json_path_check(payload, path=f"events[{index}]({event_type})")


class _InputCache:
    """Task inputs by task id, least recently used first out, bounded in bytes
    (``AGENTS_INPUT_CACHE_BYTES`` per process): an input never changes after creation,
    and re-reading a large one on every step was a third of the step's cost."""

    def __init__(self) -> None:
        self._items: OrderedDict[UUID, tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def get(self, task_id: UUID) -> Any:
        if task_id in self._items:
            self._items.move_to_end(task_id)
            return self._items[task_id][0]
        raw = (
            AgentTask.objects.annotate(raw=Cast("input", TextField()))
            .values_list("raw", flat=True)
            .get(pk=task_id)
        )
        value = _decode(raw)
        size = len(raw)
        limit = settings.AGENTS["INPUT_CACHE_BYTES"]
        if size <= limit // 4:
            self._items[task_id] = (value, size)
            self._bytes += size
            while self._bytes > limit:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return value


def _decode(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


_inputs = _InputCache()


def _task_input(task_id: UUID) -> Any:
    """The task's input; each step gets its own copy, so an agent that modifies it
    affects nothing else."""
    return copy.deepcopy(_inputs.get(task_id))


def _migrate(agent: Agent, checkpoint: Checkpoint, events: list[tuple[str, dict[str, Any]]]):
    state = checkpoint.state
    version = checkpoint.schema_version
    while version < agent.state_version:
        state = agent.migrations[version](state)
        events.append(
            (
                EventType.STATE_MIGRATED,
                {"from_version": version, "to_version": version + 1, "checkpoint": checkpoint.step},
            )
        )
        version += 1
    return state


def _resumption(task_id: UUID, step: int, checkpoint: Checkpoint) -> Resumption | None:
    if "suspended" not in checkpoint.observations:
        return None
    return scheduling.resumption_for(task_id=task_id, step=step)


def _commit(
    task_id: UUID,
    fence: int,
    agent: Agent,
    done: list[_Done],
    *,
    hand_on: bool,
    chain: _Chain,
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
        not hand_on or isinstance(last, Continue | CallTools)
    ):
        result = _commit_advance(task_id, fence, agent, done, hand_on=hand_on, chain=chain)
        if result is not None:
            return result
    chain.head = None
    published, chain.published = chain.published, None
    return _commit_general(task_id, fence, agent, done, hand_on=hand_on, published=published)


def _observations(record: _Done) -> dict[str, Any]:
    observations: dict[str, Any] = {}
    if record.results:
        observations["tool_results"] = [asdict(r) for r in record.results]
    if isinstance(record.outcome, Suspend):
        observations["suspended"] = True
    return observations


def _checkpoints_and_events(
    task: AgentTask, agent: Agent, done: list[_Done], audit: AuditBatch
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


def _events_add(audit: AuditBatch, done: list[_Done]) -> None:
    for record in done:
        audit.add_all(record.events, step=record.step)
        audit.add(
            EventType.STEP,
            {"outcome": _OUTCOME_NAMES[type(record.outcome)], "duration_ms": record.duration_ms},
            step=record.step,
        )


def _committed(agent: Agent, done: list[_Done]) -> StepResult:
    fault_point("after_commit", step=done[-1].step)
    for record in done:
        metrics.step_committed(agent=agent.name, duration_ms=record.duration_ms)
    return StepResult.COMMITTED


def _commit_advance(
    task_id: UUID,
    fence: int,
    agent: Agent,
    done: list[_Done],
    *,
    hand_on: bool,
    chain: _Chain,
) -> StepResult | None:
    """The hot path (PostgreSQL, the task only moves on): one statement advances the
    task, fenced, and inserts the checkpoints and the audit events, sealed onto the
    chain head this delivery knows; then the next step's publish and the commit. None:
    not applicable (lease lost, deadline passed, or another writer added audit events
    meanwhile); nothing was written and the general path finds out which."""
    head = chain.head or _audit_head(task_id)
    task = AgentTask(
        id=task_id, agent_name=agent.name, current_step=done[-1].step + 1, audit_seq=head[0]
    )
    audit = AuditBatch(task, actor=_actor(), head=head)
    _events_add(audit, done)
    own = (
        hand_on
        and not dispatch.publishes_are_collected()
        and connection.get_autocommit()
        and not connection.in_atomic_block
        and not audit.counts_tasks()
    )
    if not own:
        return _commit_advance_atomic(task, fence, agent, done, audit, head, hand_on, chain)
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
    done: list[_Done],
    audit: AuditBatch,
    head: tuple[int, str],
    hand_on: bool,
    chain: _Chain,
) -> StepResult | None:
    """``_commit_advance`` in a Django transaction: a commit that keeps the delivery
    going (``hand_on`` False), one inside ``publishes_collected`` or inside the
    caller's ``atomic`` block."""
    with transaction.atomic():
        events = audit.seal()
        sql, params = _advance_statement(
            task, fence, agent, done, events, seq=head[0], hand_on=hand_on
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if row is None:
            transaction.set_rollback(True)  # nothing was written; forget the counters
            return None
        task.status = row[0]
        fault_point("before_commit", step=done[-1].step)
        if hand_on and task.status == TaskStatus.RUNNING:
            # Inside ``publishes_collected``: the in-process runner takes it.
            dispatch.step_publish_in_commit(task=task, agent=agent)
        fault_point("after_publish", step=done[-1].step)
    chain.head = (events[-1].seq, events[-1].hash)
    return _committed(agent, done)


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
    done: list[_Done],
    events: list[AuditEvent],
    *,
    seq: int,
    hand_on: bool,
) -> tuple[str, dict[str, Any]]:
    """``_ADVANCE_SQL`` and its parameters for ``done``, sealed ``events`` and the audit
    sequence ``seq`` the chain head had; ``hand_on`` also releases the lease."""
    release = (
        ", lease_owner = '', lease_expires_at = NULL,"
        " in_flight = CASE WHEN status = 'running' THEN 1 ELSE 0 END"
        if hand_on
        else ""
    )
    params: dict[str, Any] = {
        "id": task.pk,
        "fence": fence,
        "first": done[0].step,
        "next": done[-1].step + 1,
        "version": agent.state_version,
        "agent_version": agent.version,
        "seq": seq,
        "last_seq": task.audit_seq,
        "now": clock.now(),
        "created": events[0].created_at,
        "checkpoints": json.dumps(
            [{"step": r.step, "state": r.state, "observations": _observations(r)} for r in done]
        ),
        "events": json.dumps(
            [
                {
                    "seq": e.seq,
                    "type": e.type,
                    "step": e.step,
                    "payload": e.payload,
                    "actor": e.actor,
                    "prev_hash": e.prev_hash,
                    "hash": e.hash,
                }
                for e in events
            ]
        ),
    }
    return _ADVANCE_SQL.format(release=release), params


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
    (``_Chain.published``), or the delivery that gets it finds its step not current and
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
       SET current_step = %(next)s, attempt = 0, retry_at = NULL, worker_losses = 0,
           state_version = %(version)s, agent_version = %(agent_version)s,
           audit_seq = %(last_seq)s, updated_at = %(now)s,
           needs_state_version = NULL{{release}}
     WHERE id = %(id)s AND fence = %(fence)s AND current_step = %(first)s
       AND audit_seq = %(seq)s AND (deadline IS NULL OR deadline > %(now)s)
 RETURNING status
), checkpoints AS (
    INSERT INTO {Checkpoint._meta.db_table}
           (task_id, step, state, observations, schema_version, created_at)
    SELECT %(id)s, c.step, c.state, c.observations, %(version)s, %(created)s
      FROM advanced,
           jsonb_to_recordset(%(checkpoints)s::jsonb)
               AS c(step integer, state jsonb, observations jsonb)
), events AS (
    INSERT INTO {AuditEvent._meta.db_table}
           (task_id, seq, type, step, payload, actor, created_at, prev_hash, hash)
    SELECT %(id)s, e.seq, e.type, e.step, e.payload, e.actor, %(created)s, e.prev_hash, e.hash
      FROM advanced,
           jsonb_to_recordset(%(events)s::jsonb)
               AS e(seq integer, type text, step integer, payload jsonb, actor text,
                    prev_hash text, hash text)
)
SELECT status FROM advanced
"""


def _audit_head(task_id: UUID) -> tuple[int, str]:
    """``(audit_seq, hash of that event)`` of the task, read now ("" before any event)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT t.audit_seq, (SELECT a.hash FROM {AuditEvent._meta.db_table} AS a"
            "  WHERE a.task_id = t.id AND a.seq = t.audit_seq)"
            f" FROM {AgentTask._meta.db_table} AS t WHERE t.id = %s",
            [task_id],
        )
        row = cursor.fetchone()
    return (row[0], row[1] or "") if row else (0, "")


def _commit_general(
    task_id: UUID,
    fence: int,
    agent: Agent,
    done: list[_Done],
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
        audit = AuditBatch(task, actor=_actor())
        _checkpoints_and_events(task, agent, done, audit)
        publish_next = False
        fields = list(_ADVANCE_FIELDS)
        if not hand_on:
            fields = [f for f in fields if f not in RELEASE_FIELDS]
        elif task.status != TaskStatus.RUNNING:
            # Cancelled or timed out while the step ran: keep its work, start nothing new.
            logger.info("step recorded after the task stopped", status=task.status)
        elif isinstance(outcome, Continue | CallTools):
            publish_next = True
        elif isinstance(outcome, Finish):
            task.result = outcome.result
            transition(task, TaskStatus.COMPLETED, audit=audit)
            fields += ["result", *TRANSITION_FIELDS]
        elif isinstance(outcome, Fail):
            task.error = safe_text(outcome.error)
            transition(task, TaskStatus.FAILED, audit=audit, reason=task.error)
            fields += ["error", *TRANSITION_FIELDS]
        elif isinstance(outcome, Suspend):
            publish_next = scheduling.suspension_open(
                task=task, step=step, outcome=outcome, audit=audit
            )
            fields += TRANSITION_FIELDS
        task.current_step = step + 1
        task.attempt = 0
        task.retry_at = None
        task.worker_losses = 0
        task.state_version = agent.state_version
        # A compatible newer version that ran a step keeps the task from then on.
        task.agent_version = agent.version
        task.updated_at = now
        task.needs_state_version = None
        if hand_on:
            task.in_flight = 1 if publish_next else 0
            for name, value in lease_release_values().items():
                setattr(task, name, value)
        audit.flush()
        task.save(update_fields=fields)
        fault_point("before_commit", step=step)
        if publish_next and published is None:
            dispatch.step_publish_in_commit(task=task, agent=agent)
        elif publish_next and not published:
            dispatch.step_unpublished(task=task)
        fault_point("after_publish", step=step)
    return _committed(agent, done)
