"""Writing the audit trail. Events are only ever appended, in the caller's transaction."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.utils import timezone

from audit.integrity import Break, audit_chain_verify, event_seal
from audit.models import AuditEvent, EventType
from audit.redaction import redact

if TYPE_CHECKING:
    from agents.models import AgentTask


_HOST = socket.gethostname()


def process_actor(role: str) -> str:
    """The actor name for work done by this process: ``<role>:<host>:<pid>``."""
    return f"{role}:{_HOST}:{os.getpid()}"


def user_actor(user: Any) -> str:
    return f"user:{user.get_username()}" if user is not None else "system"


def _last_hash(task: AgentTask) -> str:
    if not task.audit_seq:
        return ""
    last = (
        AuditEvent.objects.filter(task_id=task.pk, seq=task.audit_seq)
        .values_list("hash", flat=True)
        .first()
    )
    return last or ""


class AuditBatch:
    """Events for one task, collected in memory and written with one INSERT.

    The caller holds the task's row lock (``select_for_update``) in an open transaction,
    calls ``flush`` once, and saves the task with ``audit_seq`` among its fields: the lock
    makes the sequence numbers gap-free and unique, the transaction makes the events
    commit or vanish together with the change they describe.
    """

    def __init__(
        self,
        task: AgentTask,
        *,
        actor: str,
        secrets: Iterable[str] = (),
        head: tuple[int, str] | None = None,
    ) -> None:
        """``head``: ``(seq, hash)`` of the task's last event, when the caller already
        read it; used only if ``seq`` is still ``task.audit_seq`` at ``flush``, which
        then needs no query for the hash the chain continues from."""
        self.task = task
        self.actor = actor
        self.secrets = tuple(secrets)
        self.head = head
        self._events: list[AuditEvent] = []

    def add(
        self,
        type: EventType | str,
        payload: dict[str, Any] | None = None,
        *,
        step: int | None = None,
        actor: str | None = None,
    ) -> None:
        self._events.append(
            AuditEvent(
                task_id=self.task.pk,
                type=type,
                step=step,
                payload=redact(payload or {}, secrets=self.secrets),
                actor=actor or self.actor,
            )
        )

    def add_all(self, events: Iterable[tuple[str, dict[str, Any]]], *, step: int) -> None:
        """Add events collected while a step ran (``(type, payload)`` pairs)."""
        for event_type, payload in events:
            self.add(event_type, payload, step=step)

    def __len__(self) -> int:
        return len(self._events)

    def counts_tasks(self) -> bool:
        """Whether the collected events imply a task counter (a ``created`` event, a
        transition into a finishing status), which only a Django commit counts."""
        return _implies_counters(self._events)

    def seal(self, *, explicit_transaction: bool = False) -> list[AuditEvent]:
        """Number the collected events after ``task.audit_seq``, time-stamp them and chain
        each to the one before it (``audit.integrity``), advance ``task.audit_seq`` past
        them and hand them over, unsaved: the caller inserts them in its transaction
        (``flush`` does). The task counters they imply are counted when it commits.

        ``explicit_transaction``: the caller inserts them between ``BEGIN`` and
        ``COMMIT`` statements of its own, not in a Django ``atomic`` block (the step
        engine's hot path, ``agents.core.engine._advance_publishing``); such events
        must imply no task counter, which only a Django commit counts.

        Raises ``RuntimeError`` outside a transaction, or for an explicit transaction's
        events that imply a counter.
        """
        events, self._events = self._events, []
        if not events:
            return []
        if explicit_transaction:
            if _implies_counters(events):
                raise RuntimeError("events that count a task need a Django transaction")
        elif not transaction.get_connection().in_atomic_block:
            raise RuntimeError("audit events are written in the transaction of their change")
        now = timezone.now()
        # The row lock the caller holds (or the fenced UPDATE that checks audit_seq)
        # keeps the chain linear.
        if self.head is not None and self.head[0] == self.task.audit_seq:
            prev_hash = self.head[1]
        else:
            prev_hash = _last_hash(self.task)
        for offset, event in enumerate(events, start=1):
            event.seq = self.task.audit_seq + offset
            event.created_at = now
            event_seal(event, prev_hash=prev_hash)
            prev_hash = event.hash
        self.task.audit_seq += len(events)
        _count_when_committed(self.task.agent_name, events)
        return events

    def flush(self) -> None:
        """Seal the collected events (``seal``) and insert them with one INSERT."""
        events = self.seal()
        if events:
            AuditEvent.objects.bulk_create(events)


@dataclass(frozen=True)
class VerifyReport:
    tasks: int
    verified: int
    unverifiable: int
    breaks: list[Break]


def audit_verify(*, task_ids: Iterable[Any] | None = None) -> VerifyReport:
    """Check the hash chain of the given tasks' audit trails (``None``: every task).

    Safe to run at any time (read-only); a break means an event was changed, removed or
    inserted outside ``AuditBatch`` (see ``audit.integrity`` and RUNBOOK.md).
    """
    from agents.models import AgentTask

    tasks = AgentTask.objects.order_by("created_at", "id")
    if task_ids is not None:
        tasks = tasks.filter(pk__in=list(task_ids))
    breaks: list[Break] = []
    count = verified = 0
    for task_id, audit_seq in tasks.values_list("id", "audit_seq").iterator(chunk_size=500):
        found, ok = audit_chain_verify(task_id=task_id, audit_seq=audit_seq)
        breaks.extend(found)
        verified += ok
        count += 1
    unverifiable = AuditEvent.objects.filter(hash="")
    if task_ids is not None:
        unverifiable = unverifiable.filter(task_id__in=list(task_ids))
    return VerifyReport(
        tasks=count, verified=verified, unverifiable=unverifiable.count(), breaks=breaks
    )


def _counters(events: list[AuditEvent]) -> tuple[int, list[str]]:
    """(tasks created, statuses tasks finished in) that ``events`` record."""
    from agents_project import metrics

    created = sum(1 for event in events if event.type == EventType.CREATED)
    finished = [
        str(event.payload.get("to"))
        for event in events
        if event.type == EventType.TRANSITION and event.payload.get("to") in metrics.FINISHED
    ]
    return created, finished


def _implies_counters(events: list[AuditEvent]) -> bool:
    created, finished = _counters(events)
    return bool(created or finished)


def _count_when_committed(agent: str, events: list[AuditEvent]) -> None:
    """The task counters (``agents_tasks_created_total``, ``agents_tasks_finished_total``)
    follow the trail: a ``created`` event, a ``transition`` into a finishing status. They
    are counted once the transaction commits, so a rolled-back change counts nothing."""
    from agents_project import metrics

    created, finished = _counters(events)
    if not created and not finished:
        return

    def count() -> None:
        for _ in range(created):
            metrics.task_created(agent=agent)
        for status in finished:
            metrics.task_finished(agent=agent, status=status)

    transaction.on_commit(count)
