"""Hand-offs: a step gives its wait to another process and frees its pool process.

A step that would wait long on the network (a model call) raises
``agents.definition.HandOff`` with what to do. ``step_hand_off`` (the engine's) then, in
one transaction on the task's locked row, fenced by the step's token:

1. publishes ``{"task_id", "step", "fence", "payload", "published_at", "traceparent"}``
   (the step's trace context, "" when tracing is off) to the hand-off queue
   (``AGENTS_HANDOFF_QUEUE``, confirmed by the broker);
2. passes the lease to the queue: its owner becomes ``handoff/<queue>`` and it expires
   after ``AGENTS_HANDOFF_PATIENCE`` seconds; ``in_flight`` stays 1, since the hand-off
   message is now the step's message.

The consumer (the model gateway, ``llm.gateway``) calls, from its own threads:

- ``handoff_claim`` when it takes a message: the lease becomes its own (same fence),
  unless the step moved on (drop the message) or a live holder has it (wait);
- ``handoffs_renew`` about every second for everything it holds: one statement renews
  them all and says which were lost (cancelled, timed out, taken over), whose work
  the consumer stops;
- ``handoff_return`` when done: publishes the step again to the work queue, with what
  it learned (``StepContext.handed_back``), and releases the lease, in one transaction
  that may also hold the consumer's own writes (the recorded reply);
- ``handoff_give_back`` on shutdown: the lease goes back to the queue, whose message
  the consumer returns unacknowledged, for another consumer.

A consumer that dies holding a step leaves its message unacknowledged: the broker
gives it to another consumer, whose claim takes the lease once it expires (at once if
the dead process was on the same machine). A hand-off message older than the step
(the sweep published the step again after the patience ran out) fails the fence and
is dropped. So at most one process works on a step at any time, and its work is kept
only if its lease still holds when it returns it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest

from agents.core import clock
from agents.core.dispatch import handoff_publish, step_publish
from agents.core.leases import lease_holder_gone, lease_ttl
from agents.core.state_machine import RUNNABLE
from agents.definition import Agent, registered_agents
from agents.models import AgentTask
from agents_project import tracing

logger = structlog.get_logger(__name__)

QUEUED_OWNER_PREFIX = "handoff/"


def queued_owner() -> str:
    """The lease owner of a step waiting in the hand-off queue."""
    return f"{QUEUED_OWNER_PREFIX}{settings.AGENTS['HANDOFF_QUEUE']}"


def handoff_message(*, task_id: UUID, step: int, fence: int, payload: dict[str, Any]) -> None:
    """Publish the hand-off of ``step`` (fenced by ``fence``) with ``payload``, confirmed;
    ``Backpressure`` if the broker refuses. For use inside the transaction that passes
    the lease to the queue (``queued_lease``)."""
    handoff_publish(
        body={
            "task_id": str(task_id),
            "step": step,
            "fence": fence,
            "payload": payload,
            "published_at": time.time(),
            "traceparent": tracing.current_traceparent(),
        }
    )


def queued_lease() -> tuple[str, float]:
    """``(lease owner, seconds)`` of a step waiting in the hand-off queue: the queue's
    owner name and ``AGENTS_HANDOFF_PATIENCE``."""
    return queued_owner(), float(settings.AGENTS["HANDOFF_PATIENCE"])


def step_hand_off(
    *, task_id: UUID, step: int, fence: int, owner: str, payload: dict[str, Any]
) -> bool:
    """Publish the hand-off of ``step`` and pass its lease to the hand-off queue, if
    ``owner`` still holds the lease ``fence``. False when it does not (the step was
    taken over: nothing is published). Raises ``agents_project.errors.Backpressure``
    when the broker refuses (nothing changed)."""
    with transaction.atomic():
        # The update locks the row: the publish goes out before the commit (an outbox
        # without the table, as ``agents.core.dispatch`` does).
        queue, patience = queued_lease()
        held = AgentTask.objects.filter(
            pk=task_id, fence=fence, lease_owner=owner, current_step=step
        ).update(lease_owner=queue, lease_expires_at=clock.now() + timedelta(seconds=patience))
        if not held:
            return False
        handoff_message(task_id=task_id, step=step, fence=fence, payload=payload)
    return True


@dataclass(frozen=True)
class HandOffClaim:
    """What a consumer's claim found: ``claimed``; else ``wait`` seconds (a live holder
    has the step: claim again then) or neither (drop the message)."""

    claimed: bool
    wait: float = 0.0


def handoff_claim(*, task_id: UUID, step: int, fence: int, holder: str) -> HandOffClaim:
    """Take the lease of a handed-off step for ``holder`` (a ``lease_owner_name``).

    Claimed when the step is current, its task runnable, the fence unchanged, and the
    lease is the queue's, ``holder``'s own (a redelivery to the same consumer), expired,
    or held by a process of this machine that no longer exists."""
    now = clock.now()
    base = AgentTask.objects.filter(pk=task_id, current_step=step, fence=fence, status__in=RUNNABLE)
    # The common case in one statement: the lease is the queue's (or already ours).
    if _claim_queued(task_id, step, fence, holder, now + timedelta(seconds=lease_ttl())):
        return HandOffClaim(True)
    row = base.values("lease_owner", "lease_expires_at").first()
    if row is None:
        return HandOffClaim(False)
    free = Q(lease_owner__startswith=QUEUED_OWNER_PREFIX) | Q(lease_owner=holder)
    free |= Q(lease_expires_at__lte=now) | Q(lease_expires_at__isnull=True)
    if row["lease_owner"] and lease_holder_gone(row["lease_owner"]):
        free |= Q(lease_owner=row["lease_owner"])
    if row["lease_owner"] == "" and row["lease_expires_at"] is None:
        # Released by a consumer that returned it: the work queue has the step now.
        return HandOffClaim(False)
    taken = base.filter(free).update(
        lease_owner=holder, lease_expires_at=now + timedelta(seconds=lease_ttl())
    )
    if taken:
        return HandOffClaim(True)
    expires = row["lease_expires_at"]
    wait = (expires - now).total_seconds() if expires is not None else 0.0
    return HandOffClaim(False, wait=max(min(wait, lease_ttl()), 0.1))


def _claim_queued(task_id: UUID, step: int, fence: int, holder: str, expires: Any) -> bool:
    """Take the lease if it is the queue's or ``holder``'s own, in one statement.

    A hand-off is published inside the transaction that passes the lease to the queue,
    and that transaction may also advance the task to ``step`` (a step committed with
    the next one's hand-off, ``agents.core.commit``), so the message can arrive before
    it commits. The UPDATE therefore also matches the row one step behind, and the row
    at ``step`` whose lease is not (yet) free: the row is locked, so it waits for that
    commit, and PostgreSQL evaluates the WHERE again on the row as committed (READ
    COMMITTED, PostgreSQL manual 13.2.1); the CASEs change nothing if the lease is
    still not free (that transaction rolled back, or a live holder has it). Matching
    only a free lease at ``step``, it would see the old row, match nothing and not wait,
    and the claim would wait for the step's lease to expire instead (``handoff_claim``),
    past the step's time limit."""
    if connection.vendor != "postgresql":
        return bool(
            AgentTask.objects.filter(
                Q(lease_owner__startswith=QUEUED_OWNER_PREFIX) | Q(lease_owner=holder),
                pk=task_id,
                current_step=step,
                fence=fence,
                status__in=RUNNABLE,
            ).update(lease_owner=holder, lease_expires_at=expires)
        )
    free = "(t.lease_owner LIKE %(queued)s OR t.lease_owner = %(holder)s)"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {AgentTask._meta.db_table} AS t
               SET lease_owner = CASE WHEN t.current_step = %(step)s AND {free}
                                      THEN %(holder)s ELSE t.lease_owner END,
                   lease_expires_at = CASE WHEN t.current_step = %(step)s AND {free}
                                           THEN %(expires)s ELSE t.lease_expires_at END
             WHERE t.id = %(id)s AND t.fence = %(fence)s AND t.status = ANY(%(runnable)s)
               AND t.current_step IN (%(step)s, %(step)s - 1)
         RETURNING t.current_step, t.lease_owner
            """,
            {
                "id": task_id,
                "step": step,
                "fence": fence,
                "holder": holder,
                "expires": expires,
                "queued": QUEUED_OWNER_PREFIX + "%",  # (the prefix has no wildcard)
                "runnable": sorted(RUNNABLE),
            },
        )
        row = cursor.fetchone()
    return row is not None and row[0] == step and row[1] == holder


def handoffs_renew(*, holder: str, held: list[tuple[UUID, int]]) -> set[UUID]:
    """Renew ``holder``'s leases ``(task id, fence)``; returns the task ids whose lease
    still holds (the others were cancelled, timed out, or taken over)."""
    if not held:
        return set()
    fences = Q()
    for task_id, fence in held:
        fences |= Q(pk=task_id, fence=fence)
    renewed = AgentTask.objects.filter(fences, lease_owner=holder, status__in=RUNNABLE)
    ids = set(renewed.values_list("pk", flat=True))
    if ids:
        AgentTask.objects.filter(pk__in=ids, lease_owner=holder).update(
            lease_expires_at=clock.now() + timedelta(seconds=lease_ttl())
        )
    return ids


def handoff_return(
    *,
    task_id: UUID,
    step: int,
    fence: int,
    holder: str,
    agent_name: str,
    handed_back: dict[str, Any],
    also: Any = None,
    traceparent: str = "",
) -> bool:
    """Publish ``step`` again to the work queue with ``handed_back`` and release
    ``holder``'s lease, in one transaction, if the lease still holds; ``also()`` (the
    consumer's own writes) runs first in the same transaction. A task no longer
    runnable (cancelled) gets its lease released and nothing published. False, with
    nothing written, when the lease was lost. Raises ``Backpressure`` if the broker
    refuses (nothing written: the consumer keeps the step and tries again).
    ``traceparent``: the consumer's span, which the step's next span continues."""
    held = AgentTask.objects.filter(pk=task_id, fence=fence, lease_owner=holder, current_step=step)
    agent: Agent | None = registered_agents().get(agent_name)
    with transaction.atomic():
        # The update locks the row; the publish goes out before the commit.
        # updated_at: when the step was published again, which the takeover sweep
        # measures its grace from (``agents.core.scheduler``).
        runnable = held.filter(status__in=RUNNABLE).update(
            lease_owner="", lease_expires_at=None, updated_at=clock.now()
        )
        if runnable and agent is not None:
            if also is not None:
                also()
            step_publish(
                task_id=task_id,
                step=step,
                agent=agent,
                handed_back=handed_back,
                traceparent=traceparent,
            )
    if runnable:
        return True  # (an agent unknown here: the stuck-task sweep of a worker that has it)
    return bool(held.update(lease_owner="", lease_expires_at=None))


def handoff_release(*, task_id: UUID, fence: int, holder: str) -> None:
    """Let go of a step whose lease was lost (its task was cancelled or ended): the
    lease, if still ``holder``'s, is released and the message counted as consumed."""
    AgentTask.objects.filter(pk=task_id, fence=fence, lease_owner=holder).update(
        lease_owner="", lease_expires_at=None, in_flight=Greatest(F("in_flight") - 1, 0)
    )


def handoff_give_back(*, task_id: UUID, fence: int, holder: str) -> bool:
    """Pass ``holder``'s lease back to the hand-off queue (a shutting-down consumer,
    whose message goes back unacknowledged to the queue). False if it was lost."""
    return bool(
        AgentTask.objects.filter(pk=task_id, fence=fence, lease_owner=holder).update(
            lease_owner=queued_owner(),
            lease_expires_at=clock.now() + timedelta(seconds=settings.AGENTS["HANDOFF_PATIENCE"]),
        )
    )
