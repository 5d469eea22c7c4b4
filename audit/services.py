"""Writing the audit trail. Events are only ever appended, in the caller's transaction."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from agents_project.redaction import redact
from audit.integrity import Break, audit_chain_verify, event_seal, unchained_through
from audit.models import AuditEvent, EventType


class Audited(Protocol):
    """What ``AuditBatch`` reads and advances of the object whose trail it writes (a
    task): its id, and ``audit_seq``, the sequence number of its last event."""

    pk: Any
    audit_seq: int


_HOST = socket.gethostname()


def events_insert_sql(after: str) -> str:
    """The SQL of a CTE body that inserts sealed events passed as one JSON array (see
    ``events_json``), once per row of ``after`` (a CTE's name), so that it writes
    nothing when ``after`` matched nothing. Its named placeholders: ``%(id)s`` the
    task's id, ``%(created)s`` the events' time, ``%(events)s`` the array."""
    return f"""
    INSERT INTO {AuditEvent._meta.db_table}
           (task_id, seq, type, step, payload, actor, created_at, hash)
    SELECT %(id)s, e.seq, e.type, e.step, e.payload, e.actor, %(created)s,
           decode(e.hash, 'hex')
      FROM {after},
           jsonb_to_recordset(%(events)s::jsonb)
               AS e(seq integer, type text, step integer, payload jsonb, actor text,
                    hash text)"""


def events_json(events: Iterable[AuditEvent]) -> str:
    """Sealed ``events`` as the JSON array ``events_insert_sql`` reads."""
    return json.dumps(
        [
            {
                "seq": e.seq,
                "type": e.type,
                "step": e.step,
                "payload": e.payload,
                "actor": e.actor,
                "hash": e.hash,
            }
            for e in events
        ]
    )


def process_actor(role: str) -> str:
    """The actor name for work done by this process: ``<role>:<host>:<pid>``."""
    return f"{role}:{_HOST}:{os.getpid()}"


def user_actor(user: Any) -> str:
    return f"user:{user.get_username()}" if user is not None else "system"


def _last_hash(task: Audited) -> str:
    if not task.audit_seq:
        return ""
    last = (
        AuditEvent.objects.filter(task_id=task.pk, seq=task.audit_seq)
        .order_by()  # (task, seq) is unique; the default order would join the task table
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
        task: Audited,
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

    def seal(self, *, explicit_transaction: bool = False) -> list[AuditEvent]:
        """Number the collected events after ``task.audit_seq``, time-stamp them and chain
        each to the one before it (``audit.integrity``), advance ``task.audit_seq`` past
        them and hand them over, unsaved: the caller inserts them in its transaction
        (``flush`` does).

        ``explicit_transaction``: the caller inserts them between ``BEGIN`` and
        ``COMMIT`` statements of its own, not in a Django ``atomic`` block (the step
        engine's hot path, ``agents.core.commit``).

        Raises ``RuntimeError`` outside a transaction.
        """
        events, self._events = self._events, []
        if not events:
            return []
        if not explicit_transaction and not transaction.get_connection().in_atomic_block:
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
        # The chain's head is now the last of these: a later seal continues from it.
        self.head = (self.task.audit_seq, prev_hash)
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


def audit_verify(*, tasks: Iterable[tuple[UUID, int]]) -> VerifyReport:
    """Check the hash chain of each ``(task id, audit_seq)`` in ``tasks``, where
    ``audit_seq`` is the sequence number the task's last event should have.

    Safe to run at any time (read-only); a break means an event was changed, removed or
    inserted outside ``AuditBatch`` (see ``audit.integrity`` and RUNBOOK.md).
    """
    breaks: list[Break] = []
    count = verified = unverifiable = 0
    chain_start = unchained_through()
    for task_id, audit_seq in tasks:
        found, ok, unchained = audit_chain_verify(
            task_id=task_id, audit_seq=audit_seq, chain_start=chain_start
        )
        breaks.extend(found)
        verified += ok
        unverifiable += unchained
        count += 1
    return VerifyReport(tasks=count, verified=verified, unverifiable=unverifiable, breaks=breaks)
