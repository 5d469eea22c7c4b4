"""Leases: at most one live copy of a step.

A delivery of ``(task, step)`` may run the step only while it holds the task's lease:

- **Claim.** The delivery reads the task and its latest checkpoint (one query), then
  takes the lease with a compare-and-swap on the fencing token: ``UPDATE ... SET
  fence = fence + 1, lease_owner = me, lease_expires_at = now + LEASE_TTL WHERE fence =
  <the fence it read>``. Every time is the database's (``agents.core.clock``).
- **Heartbeat.** While the step runs, a thread of the process renews the lease every
  ``LEASE_TTL / 6`` seconds, so a healthy step keeps it however long it runs (up to its
  hard time limit, when the process is killed and the renewals stop).
- **Fence.** The step's result is written only if the fencing token is still the one
  this copy took: a copy that lost its lease cannot commit (``agents.core.engine``).
- **A delivery that finds the lease held** waits until the lease is either renewed
  (its holder is alive: the delivery is a duplicate, dropped) or expires (the holder
  died: take over). A holder on this machine whose process is gone is recognised at
  once; elsewhere it takes up to ``LEASE_TTL``. A take-over of an expired lease is the
  only thing counted as a lost worker: a broker reconnect that redelivers a running
  step finds its holder alive, and a graceful shutdown hands its leases back
  (``leases_hand_back``) before it stops its pool.
- **Negative answers are confirmed under the row lock.** A plain read may see a task
  a moment before the transaction that published this message commits (the message is
  published inside that transaction, so it can arrive first); before dropping a
  delivery as stale, the claim reads again after waiting for any writer of the row.
  The commit's statement is sent just before the publish, so a message can, rarely,
  arrive before that statement locked the row: a delivery that finds the task one step
  behind, its lease held by another live copy, waits for that copy to commit or to
  end its delivery (``_wait_for_publisher``) before it drops anything.

``in_flight`` counts the messages of the current step that can still arrive. A
delivery dropped as a duplicate of the current step takes one off, so the stuck-task
sweep knows when no message is left (``agents.core.scheduler``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Greatest

from agents.core import clock
from agents.core.state_machine import RUNNABLE
from agents.models import AgentTask, Checkpoint
from agents_project import tracing

logger = structlog.get_logger(__name__)

_HOST = socket.gethostname()
# A claim re-reads the task at most this many times when a concurrent write changed it.
_CLAIM_ATTEMPTS = 5
# How often the heartbeat tries to release a given-back lease, in seconds.
_RELEASE_INTERVAL = 0.2
# How often a delivery that found the lease held looks at it again, in seconds.
_WATCH_INTERVAL = 0.1
# The hot path never reads these (possibly large) fields.
LARGE_FIELDS = ("task__input", "task__result")


def lease_ttl() -> float:
    """Seconds a lease lives without a renewal (``AGENTS_LEASE_TTL``)."""
    return settings.AGENTS["LEASE_TTL"]


def lease_owner_name(node: str) -> str:
    """``node/host:pid/nonce``: unique per delivery; ``node`` (the Celery node name) lets
    a shutting-down worker hand back its own leases, ``host:pid`` lets a delivery on the
    same machine see that a holder's process is gone."""
    return f"{node}/{_HOST}:{os.getpid()}/{uuid.uuid4().hex[:12]}"


class Verdict(StrEnum):
    CLAIMED = "claimed"
    STALE = "stale"  # not the current step, or the task cannot run: drop
    DUPLICATE = "duplicate"  # a live copy holds the step: drop
    EARLY = "early"  # a retry backoff is pending: the scheduler will publish it
    UNKNOWN = "unknown"  # no such task (its creation was rolled back)
    OVERDUE = "overdue"  # the task's deadline has passed
    # One step behind, its holder's commit neither seen nor ruled out: give it back.
    UNDECIDED = "undecided"


@dataclass
class Claim:
    """What a delivery learned: the verdict and, when claimed, the task as read (its
    large fields deferred), the checkpoint of the previous step, the fencing token, and
    whether the claim took over the expired lease of a holder that died."""

    verdict: Verdict
    task: AgentTask | None = None
    checkpoint: Checkpoint | None = None
    fence: int = 0
    took_over: bool = False
    # (seq, hash) of the task's last audit event when the claim read it, so the step's
    # commit continues the hash chain without reading it again (``AuditBatch``).
    audit_head: tuple[int, str] | None = None


def lease_claim(*, task_id: UUID, step: int, owner: str) -> Claim:
    """Take the lease on ``step`` of the task for ``owner``, or say why not.

    Waits at most about ``LEASE_TTL`` seconds (for a holder's lease to be renewed or to
    expire). Never raises for a task in the wrong state; database errors propagate.
    On PostgreSQL the common case (the step current, its lease free, no retry pending,
    the deadline ahead) is one ``UPDATE ... RETURNING``; anything else takes the
    general path below.
    """
    if connection.vendor == "postgresql":
        claim = _claim_free_lease(task_id, step, owner)
        if claim is not None:
            return claim
    confirmed = released_waited = False
    for _ in range(_CLAIM_ATTEMPTS):
        task, checkpoint = _read(task_id, step, confirm=confirmed)
        verdict = _verdict(task, step)
        if verdict is not None:
            if confirmed:
                if verdict == Verdict.STALE and _publisher_holds(task, step, owner):
                    watched = _wait_for_publisher(task_id, step)
                    if watched is None:
                        return Claim(Verdict.UNDECIDED, task)
                    if watched:
                        confirmed = False
                        continue
                if verdict in (Verdict.DUPLICATE, Verdict.EARLY):
                    _in_flight_drop(task_id, step)
                return Claim(verdict, task)
            confirmed = True
            continue
        assert task is not None
        if checkpoint is None:
            # The step's transaction committed between the two reads: read again.
            continue
        now = clock.now()
        if task.deadline is not None and task.deadline <= now:
            return Claim(Verdict.OVERDUE, task)
        expires = task.lease_expires_at
        held = expires is not None and task.lease_owner != owner
        if held and expires is not None and expires > now and not _holder_gone(task.lease_owner):
            if not _wait_for_holder(task_id, task.fence, expires):
                _in_flight_drop(task_id, step)
                return Claim(Verdict.DUPLICATE, task)
            continue
        if held and not released_waited and _holder_alive_here(task.lease_owner):
            # Expired, but its holder lives on this machine: most likely it gave its
            # message back in a database outage and its heartbeat is about to release
            # the lease (``lease_release_later``). A release is not a death.
            released_waited = True
            if _wait_for_release(task_id, task.fence):
                continue
        took_over = held
        fence = task.fence + 1
        taken = AgentTask.objects.filter(pk=task_id, fence=task.fence, current_step=step).update(
            fence=fence,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_ttl()),
            retry_at=None,
            worker_losses=F("worker_losses") + int(took_over),
        )
        if taken:
            task.fence = fence
            task.lease_owner = owner
            task.worker_losses += int(took_over)
            task.retry_at = None
            return Claim(Verdict.CLAIMED, task, checkpoint, fence, took_over)
    return Claim(Verdict.DUPLICATE, None)


def _claim_free_lease(task_id: UUID, step: int, owner: str) -> Claim | None:
    """The common case in one ``UPDATE ... RETURNING``; None: take the general path.

    The message of a step is published inside the commit of the step before it, so it
    often arrives while that commit is still open. The UPDATE therefore also matches
    the row as that commit found it (``current_step = step - 1``): the row is locked,
    so it waits for the commit, then PostgreSQL evaluates the WHERE again on the row
    as committed (READ COMMITTED, PostgreSQL manual 13.2.1) and takes the lease. Had
    it matched only the committed shape, it would have seen the old row, matched
    nothing and sent the claim down the general path. If the row it gets is still at
    the previous step (that commit rolled back), the CASEs leave every field as it was.
    What that commit wrote (the checkpoint, the audit chain's head) is read by
    ``agents_step_before`` (migration 0006), whose own snapshot sees it.
    """
    now = clock.now()
    task_table = AgentTask._meta.db_table
    params: dict[str, Any] = {
        "id": task_id,
        "step": step,
        "owner": owner,
        "now": now,
        "expires": now + timedelta(seconds=lease_ttl()),
    }
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {task_table} AS t
               SET fence = CASE WHEN t.current_step = %(step)s THEN t.fence + 1 ELSE t.fence END,
                   lease_owner = CASE WHEN t.current_step = %(step)s
                                      THEN %(owner)s ELSE t.lease_owner END,
                   lease_expires_at = CASE WHEN t.current_step = %(step)s
                                           THEN %(expires)s ELSE t.lease_expires_at END,
                   retry_at = CASE WHEN t.current_step = %(step)s THEN NULL ELSE t.retry_at END
             WHERE t.id = %(id)s
               AND ((t.current_step = %(step)s
                     AND t.status IN ('pending', 'running')
                     AND (t.retry_at IS NULL OR t.retry_at <= %(now)s)
                     AND (t.lease_expires_at IS NULL OR t.lease_owner = %(owner)s)
                     AND (t.deadline IS NULL OR t.deadline > %(now)s))
                    OR t.current_step = %(step)s - 1)
         RETURNING t.current_step, t.fence, t.owner_id, t.agent_name, t.status, t.attempt,
                   t.worker_losses, t.deadline, t.in_flight, t.agent_version,
                   agents_step_before(t.id, %(step)s), t.trace_context
            """,
            params,
        )
        row = cursor.fetchone()
    if row is None or row[0] != step:
        return None
    # The audit sequence, its last event's hash and the checkpoint of the step before,
    # read after the UPDATE waited for any commit of that step (migration 0006).
    previous = row[10]
    seq, head_hash, saved = json.loads(previous) if isinstance(previous, str) else previous
    (fence, owner_id, agent_name, status, attempt, losses, deadline, in_flight, version) = row[1:10]
    audit_head = (seq, head_hash or "") if head_hash is not None or seq == 0 else None
    task = AgentTask(
        id=task_id,
        owner_id=owner_id,
        agent_name=agent_name,
        agent_version=version,
        status=status,
        current_step=step,
        attempt=attempt,
        worker_losses=losses,
        deadline=deadline,
        in_flight=in_flight,
        fence=fence,
        lease_owner=owner,
        trace_context=row[11],
    )
    checkpoint = None
    if saved is not None:
        state, observations, schema_version = saved
        checkpoint = Checkpoint(
            task_id=task_id,
            step=step - 1,
            state=state,
            observations=observations,
            schema_version=schema_version,
        )
    return Claim(Verdict.CLAIMED, task, checkpoint, fence, took_over=False, audit_head=audit_head)


def _read(task_id: UUID, step: int, *, confirm: bool) -> tuple[AgentTask | None, Checkpoint | None]:
    if confirm:
        with transaction.atomic():
            # Task creation holds this lock until it commits (``agents.services``).
            task_creation_lock(task_id=task_id)
            # Wait for any transaction writing the row: it may be the one that published
            # this message.
            AgentTask.objects.filter(pk=task_id).update(fence=F("fence"))
            return _read(task_id, step, confirm=False)
    checkpoint = (
        Checkpoint.objects.select_related("task")
        .defer(*LARGE_FIELDS)
        .filter(task_id=task_id, step=step - 1)
        .order_by()  # (task, step) is unique: no sort
        .first()
    )
    if checkpoint is not None:
        return checkpoint.task, checkpoint
    return AgentTask.objects.defer("input", "result").filter(pk=task_id).first(), None


def task_creation_lock(*, task_id: UUID) -> None:
    """Take, until the current transaction ends, the advisory lock of a task's creation:
    the creating transaction holds it from before it publishes step 1 until it commits,
    and a claim that finds no task takes it before concluding the task does not exist.
    PostgreSQL only; on SQLite the claim waits on the database's write lock instead."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [str(task_id)])


def task_creation_locks(*, task_ids: list[UUID]) -> None:
    """``task_creation_lock`` of many tasks, in one statement."""
    if connection.vendor == "postgresql" and task_ids:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(x, 0)) FROM unnest(%s::text[]) x",
                [[str(task_id) for task_id in task_ids]],
            )


def _verdict(task: AgentTask | None, step: int) -> Verdict | None:
    if task is None:
        return Verdict.UNKNOWN
    if task.current_step != step or task.status not in RUNNABLE:
        return Verdict.STALE
    if task.retry_at is not None and task.retry_at > clock.now():
        return Verdict.EARLY
    return None


def _wait_for_holder(task_id: UUID, fence: int, expires_at: datetime) -> bool:
    """Watch a held lease. True when it expired or was released (take it over); False
    when its holder renewed it, ended the step or another copy took it (drop)."""
    deadline = time.monotonic() + lease_ttl() + 1.0
    while time.monotonic() < deadline:
        row = (
            AgentTask.objects.filter(pk=task_id)
            .values("fence", "lease_expires_at", "lease_owner")
            .first()
        )
        if row is None or row["fence"] != fence:
            return False
        if row["lease_expires_at"] is None:
            return True
        if row["lease_expires_at"] > expires_at:
            return False
        if row["lease_expires_at"] <= clock.now() or _holder_gone(row["lease_owner"]):
            return True
        time.sleep(_WATCH_INTERVAL)
    return False


def _publisher_holds(task: AgentTask | None, step: int, owner: str) -> bool:
    """Whether the task is at the step before ``step`` and another live copy holds its
    lease: most likely the copy that published this message, which sends its commit's
    statement just before it publishes (``agents.core.commit._advance_publishing``)."""
    return (
        task is not None
        and task.current_step == step - 1
        and task.status in RUNNABLE
        and task.lease_owner not in ("", owner)
        and task.lease_expires_at is not None
        and task.lease_expires_at > clock.now()
        and not _holder_gone(task.lease_owner)
    )


def _wait_for_publisher(task_id: UUID, step: int) -> bool | None:
    """Watch a task one step behind this delivery while a live copy holds its lease
    (``_publisher_holds``), looking again after 1 ms and backing off to
    ``_WATCH_INTERVAL``. True once the task moved or another copy took the lease (read
    it again); False once the holder released its lease without moving the task (its
    delivery ended: this message is left over from a commit that rolled back, and is
    dropped). None when it cannot tell within ``LEASE_TTL`` seconds, or the lease
    expired or its holder's process is gone (a commit already sent may still land):
    the message is given back to the queue, not dropped, so it cannot be lost (its
    redeliveries are bounded by ``AGENTS_DELIVERY_LIMIT``)."""
    pause = 0.001
    deadline = time.monotonic() + lease_ttl()
    first = None
    while time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, _WATCH_INTERVAL)
        row = (
            AgentTask.objects.filter(pk=task_id)
            .values("current_step", "fence", "lease_owner", "lease_expires_at")
            .first()
        )
        if row is None:
            return False
        if row["current_step"] != step - 1:
            return True
        first = first if first is not None else row["fence"]
        if row["fence"] != first:
            return True
        expires = row["lease_expires_at"]
        if expires is None:
            return False
        if expires <= clock.now() or _holder_gone(row["lease_owner"]):
            return None
    return None


def _holder_gone(owner: str) -> bool:
    """True if ``owner`` ran on this machine and its process no longer exists."""
    return _holder_here(owner) is False


def lease_holder_gone(owner: str) -> bool:
    """True if the lease owner ``owner`` ran on this machine and its process is gone."""
    return _holder_gone(owner)


def _holder_alive_here(owner: str) -> bool:
    """True if ``owner`` runs on this machine, in another process that still exists."""
    return _holder_here(owner) is True


def _holder_here(owner: str) -> bool | None:
    """Whether the process of ``owner`` exists, when it ran on this machine in another
    process than this one; None otherwise (or when it cannot be told)."""
    try:
        host, pid = owner.split("/")[1].rsplit(":", 1)
        if host != _HOST or int(pid) == os.getpid():
            return None
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, IndexError, PermissionError, OSError):
        return None
    return True


def _wait_for_release(task_id: UUID, fence: int, seconds: float = 1.0) -> bool:
    """Watch an expired lease for ``seconds``: True once it is released or taken by
    another copy (read the task again), False if it is still there (take it over)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(_WATCH_INTERVAL)
        row = AgentTask.objects.filter(pk=task_id).values("fence", "lease_expires_at").first()
        if row is None or row["fence"] != fence or row["lease_expires_at"] is None:
            return True
    return False


def _in_flight_drop(task_id: UUID, step: int) -> None:
    """One message of the current step was consumed without running it."""
    AgentTask.objects.filter(pk=task_id, current_step=step).update(
        in_flight=Greatest(F("in_flight") - 1, 0)
    )


# The fields a write that ends a delivery saves: its lease and its count of messages.
RELEASE_FIELDS = ("lease_owner", "lease_expires_at", "in_flight")


def lease_release_values() -> dict[str, object]:
    """The fields that end a lease, for a write that also ends the step's delivery."""
    return {"lease_owner": "", "lease_expires_at": None}


def leases_hand_back(*, node: str) -> int:
    """Release every lease held by processes of the Celery node ``node``: called by a
    worker whose graceful shutdown ran out of time, just before it stops its pool, so
    the redelivered steps start at once and are not counted as lost workers. Bumping
    the fence keeps the stopping copies from renewing or committing. Returns how many.

    A row locked by a transaction is skipped (``SKIP LOCKED``): the pool is frozen
    first, and a process frozen inside its step's commit holds its task's row until it
    is killed, which would otherwise make this wait forever. That step's lease then
    ends as a dead holder's does."""
    with transaction.atomic():
        held = list(
            AgentTask.objects.select_for_update(skip_locked=True)
            .filter(lease_owner__startswith=f"{node}/")
            .values_list("pk", flat=True)
        )
        return AgentTask.objects.filter(pk__in=held).update(
            lease_owner="", lease_expires_at=None, fence=F("fence") + 1
        )


class _Heartbeat:
    """One thread per process renewing the leases of the steps this process runs, and
    releasing the leases of steps whose message it gave back during a database outage
    (once the database answers again), so their redelivery is not taken for a death."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By the running thread's id: (task id, fence, owner) of the step it runs and its
        # trace, for the log lines about it (empty untraced). A pool process runs one
        # step at a time; the model gateway runs several, one per database thread.
        self._held: dict[int, tuple[tuple[UUID, int, str], dict[str, str]]] = {}
        self._to_release: set[tuple[UUID, str]] = set()
        self._wake = threading.Event()
        self._pid = 0
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        # A lock copied held by a thread of the parent would never be released here.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._held = {}  # the parent's threads are not this process's

    def release_later(self, task_id: UUID, owner: str) -> None:
        with self._lock:
            self._to_release.add((task_id, owner))
        self._start()
        self._wake.set()

    def hold(self, task_id: UUID, fence: int, owner: str) -> None:
        trace = {"trace_id": tracing.current_trace_id()} if tracing.ENABLED else {}
        with self._lock:
            self._held[threading.get_ident()] = ((task_id, fence, owner), trace)
        self._start()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # First use in this process (pool children are forked): start the thread.
            self._pid = os.getpid()
        threading.Thread(target=self._run, name="agents-lease-heartbeat", daemon=True).start()

    def release(self) -> None:
        with self._lock:
            self._held.pop(threading.get_ident(), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                releasing = bool(self._to_release)
            # A lease to release is tried every _RELEASE_INTERVAL: its message was given
            # back, and the release must land before the redelivery's claim, which waits
            # for the database with a longer backoff (``engine.step_execute``).
            self._wake.wait(_RELEASE_INTERVAL if releasing else lease_ttl() / 6)
            self._wake.clear()
            with self._lock:
                holding = list(self._held.values())
                to_release = set(self._to_release)
            if to_release:
                self._release(to_release)
            if not holding:
                # Hold no connection while idle (most steps end before the first beat).
                connection.close()
                continue
            for held, trace in holding:
                self._renew(held, trace)

    def _renew(self, held: tuple[UUID, int, str], trace: dict[str, str]) -> None:
        try:
            # The owner too: once the step's commit released the lease (same fence), a
            # late beat must not bring it back.
            renewed = AgentTask.objects.filter(
                pk=held[0], fence=held[1], lease_owner=held[2]
            ).update(lease_expires_at=clock.now() + timedelta(seconds=lease_ttl()))
        except Exception as exc:  # the database may be away; try again next beat
            logger.warning("lease renewal failed", task_id=str(held[0]), error=repr(exc), **trace)
            with contextlib.suppress(Exception):
                connection.close()
            return
        if not renewed:
            with self._lock:
                for ident, (other, _) in list(self._held.items()):
                    if other == held:
                        del self._held[ident]  # not again: nothing renews a lost lease
            logger.info(
                "lease renewal found the lease gone (its step committed, or it was taken over)",
                task_id=str(held[0]),
                **trace,
            )

    def _release(self, leases: set[tuple[UUID, str]]) -> None:
        for task_id, owner in leases:
            try:
                # The owner names one delivery: a lease taken over since is not touched.
                AgentTask.objects.filter(pk=task_id, lease_owner=owner).update(
                    lease_owner="", lease_expires_at=None
                )
            except Exception:  # still away: try again next beat
                with contextlib.suppress(Exception):
                    connection.close()
                return
            with self._lock:
                self._to_release.discard((task_id, owner))


_heartbeat = _Heartbeat()


def lease_release_later(*, task_id: UUID, owner: str) -> None:
    """Release ``owner``'s lease as soon as the database answers: for a delivery that
    gave its message back because the database stayed away."""
    _heartbeat.release_later(task_id, owner)


@contextlib.contextmanager
def lease_held(*, task_id: UUID, fence: int, owner: str) -> Iterator[None]:
    """Renew ``owner``'s lease ``(task_id, fence)`` in the background while the block
    runs."""
    _heartbeat.hold(task_id, fence, owner)
    try:
        yield
    finally:
        _heartbeat.release()


class DeadlineReached(Exception):  # noqa: N818 (a condition, not a failure of ours)
    """The task's deadline passed while its step ran."""


@contextlib.contextmanager
def deadline_alarm(deadline: datetime | None) -> Iterator[None]:
    """Raise ``DeadlineReached`` in the running step when the task's deadline (on the
    database's clock) passes. Uses ``SIGALRM``, which Celery's prefork pool leaves
    alone (its own time limits are signalled by the pool's main process); in a thread
    other than the main one (no signals there) the commit's deadline check still holds.
    """
    if deadline is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    remaining = max((deadline - clock.now()).total_seconds(), 0.001)

    def _raise(signum: int, frame: object) -> None:
        raise DeadlineReached(f"deadline {deadline.isoformat()} passed")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
