"""Tamper evidence for the audit trail: a keyed hash chain per task.

Each event stores ``prev_hash`` (the ``hash`` of the event before it in its task, ""
for the first) and ``hash`` = HMAC-SHA256(key, prev_hash + canonical content), where
the content is the task id, seq, type, step, actor, time and payload. The key is the
first of ``AGENTS_AUDIT_KEY`` (comma-separated: ``NEW,OLD`` while rotating; required in
production, elsewhere derived from ``DJANGO_SECRET_KEY`` when unset), which the
database does not hold, so someone who can write the table but not read the app's
settings cannot forge a consistent chain. Verification accepts a hash made with any
of the configured keys: a rotated-out key stays listed as long as events it signed
are kept.

``audit_chain_verify`` finds, and names by its ``kind`` (``Break.kind``), an event that
was ``changed`` (its hash no longer matches), ``removed`` (a gap in ``seq``, the next
event's ``prev_hash`` points at nothing, or fewer events than the task counted in
``audit_seq``), ``inserted`` (a ``seq`` beyond the task's count, a second event with
one number, or a ``prev_hash`` that is not its predecessor's), or whose hash was
``unsealed`` (emptied: only events written before the chain existed, up to the id
recorded in ``AuditChainStart`` by migration ``audit.0005``, may lack one). The
anchors (``audit.anchor``) find a ``cut`` tail or a ``rewritten`` chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings

from audit.models import AuditChainStart, AuditEvent

DERIVED = "derived"


def audit_keys() -> tuple[bytes, ...]:
    """The chain's keys, the one that signs first (``AGENTS_AUDIT_KEY``, comma-separated);
    when unset (never in production), one derived from ``DJANGO_SECRET_KEY``, which the
    entry ``derived`` also names (``NEW,derived``: verify what was signed before)."""
    derived = hashlib.sha256(f"agents-audit:{settings.SECRET_KEY}".encode()).digest()
    configured = [k.strip() for k in (settings.AGENTS.get("AUDIT_KEY") or "").split(",")]
    # "derived": the key used while AGENTS_AUDIT_KEY was unset (kept to verify the events
    # it signed after a key is set: AGENTS_AUDIT_KEY=NEW,derived).
    keys = tuple(derived if k == DERIVED else k.encode() for k in configured if k)
    return keys or (derived,)


def _key() -> bytes:
    return audit_keys()[0]


def _canonical_number(value: int | float) -> str:
    # jsonb keeps numbers as decimals: 1.0 comes back as 1.0, 1e300 as an integer. The
    # normalised decimal of the number as written is the same on both sides.
    return str(Decimal(repr(value)).normalize())


def _canonical(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return {"#": _canonical_number(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return str(value)


def _time(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def event_hash(
    *,
    prev_hash: str,
    task_id: Any,
    seq: int,
    type: str,
    step: int | None,
    actor: str,
    created_at: datetime,
    payload: Any,
    key: bytes | None = None,
) -> str:
    """The hex HMAC-SHA256 of one event's content chained to ``prev_hash``, under ``key``
    (default: the signing key, the first of ``AGENTS_AUDIT_KEY``)."""
    content = json.dumps(
        [
            prev_hash,
            str(task_id),
            seq,
            str(type),
            step,
            actor,
            _time(created_at),
            _canonical(payload),
        ],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hmac.new(key or _key(), content.encode("utf-8"), hashlib.sha256).hexdigest()


def event_seal(event: AuditEvent, *, prev_hash: str) -> None:
    """Set ``event.prev_hash`` and ``event.hash`` (before it is inserted)."""
    event.prev_hash = prev_hash
    event.hash = _hash_of(event, key=None)


def _hash_of(event: AuditEvent, *, key: bytes | None) -> str:
    """``event_hash`` of the event's own fields (after its ``prev_hash``)."""
    return event_hash(
        prev_hash=event.prev_hash,
        task_id=event.task_id,
        seq=event.seq,
        type=event.type,
        step=event.step,
        actor=event.actor,
        created_at=event.created_at,
        payload=event.payload,
        key=key,
    )


@dataclass(frozen=True)
class Break:
    """One place where a task's trail is not what was written. ``kind`` names the
    tampering: ``changed``, ``removed``, ``inserted``, ``unsealed`` (a hash emptied),
    ``cut`` (a tail removed below an anchored head), ``rewritten`` (an anchored head
    no longer there as anchored), ``forged-anchor`` (an anchor line whose signature
    does not verify)."""

    task_id: str
    seq: int | None
    problem: str
    kind: str = "changed"

    def __str__(self) -> str:
        if self.kind == "forged-anchor":
            return f"{self.task_id}: line {self.seq}: {self.problem} [{self.kind}]"
        where = f"event #{self.seq}" if self.seq is not None else "trail"
        return f"task {self.task_id}: {where}: {self.problem} [{self.kind}]"


def unchained_through() -> int:
    """The largest event id that may lack a hash (written before the chain existed), as
    migration ``audit.0005`` recorded it; 0 when none may."""
    start = AuditChainStart.objects.order_by("pk").first()
    return start.unchained_through_id if start is not None else 0


def _hash_matches(event: AuditEvent, keys: tuple[bytes, ...]) -> bool:
    return any(hmac.compare_digest(_hash_of(event, key=key), event.hash) for key in keys)


def audit_chain_verify(
    *, task_id: Any, audit_seq: int, chain_start: int | None = None
) -> tuple[list[Break], int, int]:
    """Check one task's events against their chain and the task's own event count
    (``audit_seq``). Returns (breaks, events verified, events written before the chain).
    Reads the events in seq order, a chunk at a time. ``chain_start``: the result of
    ``unchained_through()`` (read once by callers that verify many tasks)."""
    if chain_start is None:
        chain_start = unchained_through()
    keys = audit_keys()
    breaks: list[Break] = []
    tid = str(task_id)
    expected_seq = 1
    prev_hash = ""
    verified = unchained = 0
    events = AuditEvent.objects.filter(task_id=task_id).order_by("seq", "id")
    for event in events.iterator(chunk_size=2000):
        if event.seq < expected_seq:
            breaks.append(
                Break(tid, event.seq, "a second event with this number (inserted)", "inserted")
            )
            continue
        gap = event.seq > expected_seq
        if gap:
            missing = f"#{expected_seq}" + (
                f" to #{event.seq - 1}" if event.seq - 1 > expected_seq else ""
            )
            breaks.append(
                Break(tid, event.seq, f"events {missing} are missing (removed)", "removed")
            )
        if event.seq > audit_seq:
            breaks.append(
                Break(
                    tid,
                    event.seq,
                    f"beyond the {audit_seq} events the task recorded (inserted)",
                    "inserted",
                )
            )
        if not event.hash:
            if event.pk > chain_start:
                breaks.append(
                    Break(
                        tid,
                        event.seq,
                        "its hash was removed, but it was written after the chain began "
                        f"(event id {event.pk} > {chain_start})",
                        "unsealed",
                    )
                )
            else:
                unchained += 1
            prev_hash, expected_seq = "", event.seq + 1
            continue
        if event.prev_hash != prev_hash:
            breaks.append(
                Break(
                    tid,
                    event.seq,
                    "does not follow the event before it (removed or inserted)",
                    "removed" if gap else "inserted",
                )
            )
        if not _hash_matches(event, keys):
            breaks.append(
                Break(tid, event.seq, "its content does not match its hash (changed)", "changed")
            )
        else:
            verified += 1
        prev_hash, expected_seq = event.hash, event.seq + 1
    if expected_seq - 1 < audit_seq:
        breaks.append(
            Break(
                tid,
                None,
                f"ends at #{expected_seq - 1} but the task recorded {audit_seq} events "
                "(the last ones were removed)",
                "removed",
            )
        )
    return breaks, verified, unchained
