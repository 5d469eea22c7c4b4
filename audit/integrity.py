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

import functools
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection

from audit.models import AuditChainStart, AuditEvent, TaskRemoval

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


@functools.lru_cache(maxsize=4096)
def _canonical_number_text(text: str) -> str:
    return str(Decimal(text).normalize())


def _canonical_number(value: int | float) -> str:
    # jsonb keeps numbers as decimals: 1.0 comes back as 1.0, 1e300 as an integer. The
    # normalised decimal of the number as written is the same on both sides. Cached by
    # its text (not its value: 0.0 and -0.0 are equal but written differently).
    return _canonical_number_text(repr(value))


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


# One encoder, made once: ``json.dumps`` with options builds a new one on every call.
_ENCODE = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


def _content(
    prev_hash: str,
    task_id: Any,
    seq: int,
    type: str,
    step: int | None,
    actor: str,
    created_at: datetime,
    payload: Any,
) -> bytes:
    """The canonical bytes an event's hash covers (its ``prev_hash`` first)."""
    return _ENCODE(
        [
            prev_hash,
            str(task_id),
            seq,
            str(type),
            step,
            actor,
            _time(created_at),
            _canonical(payload),
        ]
    ).encode("utf-8")


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
    content = _content(prev_hash, task_id, seq, type, step, actor, created_at, payload)
    return hmac.digest(key or _key(), content, "sha256").hex()


def record_hash(*, prev_hash: str, content: list[Any], key: bytes | None = None) -> str:
    """The hex HMAC-SHA256 of a record other than an event (a ``TaskRemoval``, an
    archive's trailer), chained to ``prev_hash``: the same canonical JSON as events'."""
    body = _ENCODE([prev_hash, _canonical(content)]).encode("utf-8")
    return hmac.digest(key or _key(), body, "sha256").hex()


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


# What ``chain_verify`` reads of each event, in this order (``EventRow``): the payload
# as its canonical JSON text and the time as its ISO 8601 text, as they enter the hash.
EVENT_COLUMNS = ("id", "seq", "type", "step", "payload", "actor", "created_at", "prev_hash", "hash")
EventRow = tuple[int, int, str, int | None, str, str, str, str, str]

# The events of one task, the payload as jsonb's text and the time in the form
# ``_time`` writes (``created_at`` is UTC, as Django keeps it): no per-row conversion to
# Python objects beyond what the hash needs.
_EVENTS_SQL = (
    "SELECT id, seq, type, step, payload::text, actor, "
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), "
    # The digests as hex (``DigestField`` stores their 32 bytes; NULL: none).
    "COALESCE(encode(prev_hash, 'hex'), ''), COALESCE(encode(hash, 'hex'), '') "
    "FROM audit_auditevent WHERE task_id = %s ORDER BY seq, id"
)


@functools.lru_cache(maxsize=8192)
def _canonical_int(text: str) -> dict[str, str]:
    return {"#": _canonical_number(int(text))}


@functools.lru_cache(maxsize=8192)
def _canonical_float(text: str) -> dict[str, str]:
    return {"#": _canonical_number(float(text))}


# Made once: ``json.loads`` with hooks builds a new decoder on every call.
_CANONICAL_DECODE = json.JSONDecoder(parse_int=_canonical_int, parse_float=_canonical_float).decode


def canonical_payload_text(text: str) -> str:
    """The canonical JSON (``_canonical``) of a payload given as JSON text, parsed in
    one pass by the C scanner, numbers rewritten as they are read: the same text as
    ``_ENCODE(_canonical(json.loads(text)))``, several times faster."""
    return _ENCODE(_CANONICAL_DECODE(text))


def canonical_payload(payload: Any) -> str:
    """The canonical JSON text of a payload given as Python values."""
    return _ENCODE(_canonical(payload))


def _event_rows(task_id: Any) -> Iterator[EventRow]:
    with connection.chunked_cursor() as cursor:
        cursor.execute(_EVENTS_SQL, [task_id])
        while chunk := cursor.fetchmany(5000):
            for event_id, seq, type_, step, payload, actor, at, prev, digest in chunk:
                yield (
                    event_id,
                    seq,
                    type_,
                    step,
                    canonical_payload_text(payload),
                    actor,
                    at,
                    prev,
                    digest,
                )


def audit_chain_verify(
    *, task_id: Any, audit_seq: int, chain_start: int | None = None
) -> tuple[list[Break], int, int]:
    """Check one task's events in the database against their chain and the task's own
    event count (``audit_seq``). Returns (breaks, events verified, events written before
    the chain). Streams the events in seq order through a server-side cursor, 5,000
    rows a fetch, as plain rows (no model instances, no query per event).
    ``chain_start``: the result of ``unchained_through()`` (read once by callers that
    verify many tasks)."""
    if chain_start is None:
        chain_start = unchained_through()
    return chain_verify(
        _event_rows(task_id), task_id=task_id, audit_seq=audit_seq, chain_start=chain_start
    )


_STR = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _row_content(
    prev_hash: str,
    tid: str,
    seq: int,
    type_: str,
    step: int | None,
    actor: str,
    at: str,
    payload: str,
) -> bytes:
    """``_content`` of a row whose payload and time are already canonical text: the
    same bytes, written directly."""
    step_text = "null" if step is None else str(step)
    return (
        f"[{_STR(prev_hash)},{_STR(tid)},{seq},{_STR(type_)},{step_text},{_STR(actor)},"
        f"{_STR(at)},{payload}]"
    ).encode()


def chain_verify(
    rows: Iterable[EventRow], *, task_id: Any, audit_seq: int, chain_start: int
) -> tuple[list[Break], int, int]:
    """Check the events ``rows`` (``EVENT_COLUMNS``, in seq order) of one task against
    their chain and the count the task recorded (``audit_seq``), wherever they come
    from: the database, or an archive (``audit.archive``). Returns (breaks, events
    verified, events written before the chain: id up to ``chain_start``)."""
    keys = audit_keys()
    first_key, rotated = keys[0], keys[1:]
    breaks: list[Break] = []
    tid = str(task_id)
    expected_seq = 1
    prev_hash = ""
    verified = unchained = 0
    for event_id, seq, type_, step, payload, actor, created_at, event_prev, digest in rows:
        if seq < expected_seq:
            breaks.append(Break(tid, seq, "a second event with this number (inserted)", "inserted"))
            continue
        gap = seq > expected_seq
        if gap:
            missing = f"#{expected_seq}" + (f" to #{seq - 1}" if seq - 1 > expected_seq else "")
            breaks.append(Break(tid, seq, f"events {missing} are missing (removed)", "removed"))
        if seq > audit_seq:
            breaks.append(
                Break(
                    tid,
                    seq,
                    f"beyond the {audit_seq} events the task recorded (inserted)",
                    "inserted",
                )
            )
        if not digest:
            if event_id > chain_start:
                breaks.append(
                    Break(
                        tid,
                        seq,
                        "its hash was removed, but it was written after the chain began "
                        f"(event id {event_id} > {chain_start})",
                        "unsealed",
                    )
                )
            else:
                unchained += 1
            prev_hash, expected_seq = "", seq + 1
            continue
        if event_prev != prev_hash:
            breaks.append(
                Break(
                    tid,
                    seq,
                    "does not follow the event before it (removed or inserted)",
                    "removed" if gap else "inserted",
                )
            )
        content = _row_content(event_prev, tid, seq, type_, step, actor, created_at, payload)
        if hmac.digest(first_key, content, "sha256").hex() == digest or (
            rotated and any(hmac.digest(k, content, "sha256").hex() == digest for k in rotated)
        ):
            verified += 1
        else:
            breaks.append(
                Break(tid, seq, "its content does not match its hash (changed)", "changed")
            )
        prev_hash, expected_seq = digest, seq + 1
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


def removal_hash(record: TaskRemoval, *, key: bytes | None) -> str:
    """The keyed hash of a removal record's content (``TaskRemoval``), chained to its
    ``prev_hash``."""
    return record_hash(
        prev_hash=record.prev_hash,
        content=[
            record.seq,
            str(record.task_id),
            record.owner,
            record.agent_name,
            record.status,
            _time(record.finished_at) if record.finished_at else None,
            record.archive,
            record.archive_sha256,
            record.archive_bytes,
            record.counts,
            record.head_seq,
            record.head_hash,
            record.policy,
            record.actor,
            _time(record.created_at),
        ],
        key=key,
    )


def removals_verify() -> tuple[list[Break], int]:
    """Check the chain of removal records (``TaskRemoval``): none changed, removed or
    inserted. Returns (breaks, records verified)."""
    keys = audit_keys()
    breaks: list[Break] = []
    prev_hash, expected, verified = "", 1, 0
    for record in TaskRemoval.objects.order_by("seq", "id").iterator(chunk_size=2000):
        where = f"removal #{record.seq}"
        if record.seq != expected:
            kind = "removed" if record.seq > expected else "inserted"
            breaks.append(Break(where, record.seq, f"expected removal #{expected} ({kind})", kind))
        if record.prev_hash != prev_hash:
            breaks.append(
                Break(where, record.seq, "does not follow the record before it", "inserted")
            )
        if any(hmac.compare_digest(removal_hash(record, key=k), record.hash) for k in keys):
            verified += 1
        else:
            breaks.append(
                Break(where, record.seq, "its content does not match its hash (changed)", "changed")
            )
        prev_hash, expected = record.hash, record.seq + 1
    return breaks, verified
