"""Tamper evidence for the audit trail: a keyed hash chain per task.

Each event stores ``hash`` = HMAC-SHA256(key, prev_hash + canonical content), where
``prev_hash`` is the ``hash`` of the event before it in its task ("" for the first; not
stored again: migration ``audit.0010`` dropped the copy each event had) and the content
is the task id, seq, type, step, actor, time and payload. The key is the
first of ``AGENTS_AUDIT_KEY`` (comma-separated: ``NEW,OLD`` while rotating; required in
production, elsewhere derived from ``DJANGO_SECRET_KEY`` when unset), which the
database does not hold, so someone who can write the table but not read the app's
settings cannot forge a consistent chain. Verification accepts a hash made with any
of the configured keys: a rotated-out key stays listed as long as events it signed
are kept.

``audit_chain_verify`` finds, and names by its ``kind`` (``Break.kind``), an event that
was ``changed`` (its hash no longer matches), ``removed`` (a gap in ``seq``, the next
event's hash is not over the hash before it, or fewer events than the task counted in
``audit_seq``), ``inserted`` (a ``seq`` beyond the task's count, a second event with
one number, or an event the next one's hash skips), or whose hash was
``unsealed`` (emptied: only events written before the chain existed, up to the id
recorded in ``AuditChainStart`` by migration ``audit.0005``, may lack one). The
anchors (``audit.anchor``) find a ``cut`` tail or a ``rewritten`` chain.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import json
import multiprocessing
import os
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
    """Set ``event.hash`` (before it is inserted), chained to ``prev_hash``: the hash of
    the task's event before it ("" for the first)."""
    event.hash = event_hash(
        prev_hash=prev_hash,
        task_id=event.task_id,
        seq=event.seq,
        type=event.type,
        step=event.step,
        actor=event.actor,
        created_at=event.created_at,
        payload=event.payload,
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


# What ``chain_verify`` reads of each event (``EventRow``): its id, seq and stored hash
# (hex, "" when none), and the rest of the bytes its hash covers after the previous
# event's hash, ``tail``: ``,"TASK",SEQ,"TYPE",STEP,"ACTOR","TIME",PAYLOAD]`` (``_content``
# without its first element). The previous hash is not stored: it is the stored hash of
# the event before (migration ``audit.0010``).
EventRow = tuple[int, int, str, str]

# The events of one task with ``lo <= seq < hi``, in the order the chain runs, as the
# text their tails are made of: the time in UTC (``timestamp`` text: fractional seconds
# without trailing zeros), the payload as jsonb's text (made canonical here).
_EVENTS_SQL = (
    "SELECT id, seq, COALESCE(encode(hash, 'hex'), ''), type, step, actor, "
    "(created_at AT TIME ZONE 'UTC')::text, payload::text FROM audit_auditevent "
    "WHERE task_id = %s AND seq >= %s AND seq < %s ORDER BY seq, id"
)
# The event a range's verification continues from (the first of its seq, as the chain's
# walk takes it): the hash the range's first event is over.
_BEFORE_SQL = (
    "SELECT seq, COALESCE(encode(hash, 'hex'), '') FROM audit_auditevent "
    "WHERE task_id = %s AND seq < %s ORDER BY seq DESC, id LIMIT 1"
)
_NO_SEQ = 2**31  # above any seq (a PositiveIntegerField)
# A trail this long is verified by several processes, a range of seq each (below: one).
PARALLEL_EVENTS = 20_000


@functools.lru_cache(maxsize=8192)
def _canonical_int(text: str) -> dict[str, str]:
    return {"#": _canonical_number(int(text))}


@functools.lru_cache(maxsize=8192)
def _canonical_float(text: str) -> dict[str, str]:
    return {"#": _canonical_number(float(text))}


# Made once: ``json.loads`` with hooks builds a new decoder on every call.
_CANONICAL_DECODER = json.JSONDecoder(parse_int=_canonical_int, parse_float=_canonical_float)
_CANONICAL_DECODE = _CANONICAL_DECODER.decode
# The C scanner and encoder that ``decode`` and ``_ENCODE`` build or wrap, called
# directly: half the cost of a small payload was their Python-level set-up per call
# (the encoder is made anew by every ``encode``). Same options as ``_ENCODE``; no
# circular check (parsed JSON has no cycles).
# (Both are None on a Python without the ``_json`` accelerator: then the slower path.)
_SCAN = (
    json.scanner.c_make_scanner(_CANONICAL_DECODER)  # type: ignore[attr-defined]
    if json.scanner.c_make_scanner  # type: ignore[attr-defined]
    else None
)
_C_ENCODE = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None,
        json.JSONEncoder().default,
        json.encoder.encode_basestring,  # type: ignore[attr-defined]
        None,
        ":",
        ",",
        True,
        False,
        True,
    )
    if json.encoder.c_make_encoder  # type: ignore[attr-defined]
    else None
)


def canonical_payload_text(text: str) -> str:
    """The canonical JSON (``_canonical``) of a payload given as JSON text, parsed in
    one pass by the C scanner, numbers rewritten as they are read: the same text as
    ``_ENCODE(_canonical(json.loads(text)))``, several times faster. ``ValueError``
    when ``text`` is not JSON."""
    if _SCAN is not None and _C_ENCODE is not None:
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:
            value, end = None, -1
        if end == len(text):
            return "".join(_C_ENCODE(value, 0))
    return _ENCODE(_CANONICAL_DECODE(text))


def canonical_payload(payload: Any) -> str:
    """The canonical JSON text of a payload given as Python values."""
    return _ENCODE(_canonical(payload))


# A JSON string, as the canonical encoder writes it; cached: a trail has few types
# and actors.
_STR = functools.lru_cache(maxsize=4096)(json.encoder.encode_basestring)  # type: ignore[attr-defined]


def row_tail(
    task_id: Any, seq: int, type_: str, step: int | None, actor: str, at: str, payload: str
) -> str:
    """An event's ``tail`` (``EventRow``) from its fields, the time as ``_time`` writes
    it and the payload as canonical JSON text."""
    step_text = "null" if step is None else str(step)
    return (
        f",{_STR(str(task_id))},{seq},{_STR(type_)},{step_text},{_STR(actor)},{_STR(at)},{payload}]"
    )


@functools.lru_cache(maxsize=1024)
def _utc_time(text: str) -> str:
    """PostgreSQL's text of a UTC ``timestamp`` (``2026-01-02 03:04:05.12``) as ``_time``
    writes it (``2026-01-02T03:04:05.120000+00:00``). Cached: the events of one commit
    share their time."""
    day, _, clock = text.partition(" ")
    whole, _, fraction = clock.partition(".")
    return f"{day}T{whole}.{fraction.ljust(6, '0')}+00:00"


@dataclass(frozen=True)
class ChainStart:
    """Where a walk of a task's chain starts: the seq it expects next and the stored
    hash of the event before ("" for none)."""

    seq: int = 1
    prev_hash: str = ""


def _range_start(cursor: Any, task_id: Any, lo: int) -> ChainStart:
    if lo <= 1:
        return ChainStart()
    cursor.execute(_BEFORE_SQL, [task_id, lo])
    before = cursor.fetchone()
    return ChainStart() if before is None else ChainStart(seq=before[0] + 1, prev_hash=before[1])


def _range_rows(cursor: Any, task_id: Any, lo: int, hi: int) -> Iterator[EventRow]:
    # Streamed (psycopg's ``stream``, 2,000 rows a batch): PostgreSQL reads the next
    # rows while these are hashed. ``row_tail``, inlined.
    tid = _STR(str(task_id))
    for event_id, seq, digest, type_, step, actor, at, payload in cursor.stream(
        _EVENTS_SQL, [task_id, lo, hi], size=2000
    ):
        yield (
            event_id,
            seq,
            digest,
            f",{tid},{seq},{_STR(type_)},{'null' if step is None else step},{_STR(actor)},"
            f'"{_utc_time(at)}",{canonical_payload_text(payload)}]',
        )


def _range_verify(
    cursor: Any, *, task_id: Any, audit_seq: int, chain_start: int, lo: int, hi: int
) -> tuple[list[Break], int, int]:
    """``chain_verify`` of the task's events with ``lo <= seq < hi`` (a psycopg cursor)."""
    return chain_verify(
        _range_rows(cursor, task_id, lo, hi),
        task_id=task_id,
        audit_seq=audit_seq,
        chain_start=chain_start,
        start=_range_start(cursor, task_id, lo),
        last=hi >= _NO_SEQ,
    )


def _range_verify_apart(
    task_id: Any, audit_seq: int, chain_start: int, lo: int, hi: int
) -> tuple[list[Break], int, int]:
    """``_range_verify`` in a worker process, on a connection of its own."""
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    with psycopg.connect(**params, autocommit=True) as own, own.cursor() as cursor:
        return _range_verify(
            cursor, task_id=task_id, audit_seq=audit_seq, chain_start=chain_start, lo=lo, hi=hi
        )


def _ranges(audit_seq: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` seq ranges ``[lo, hi)`` covering every seq (the first from 0, the last
    open), of about the same number of events each."""
    bounds = [0] + [1 + audit_seq * k // parts for k in range(1, parts)] + [_NO_SEQ]
    return list(itertools.pairwise(bounds))


def audit_chain_verify(
    *,
    task_id: Any,
    audit_seq: int,
    chain_start: int | None = None,
    processes: int | None = None,
) -> tuple[list[Break], int, int]:
    """Check one task's events in the database against their chain and the task's own
    event count (``audit_seq``). Returns (breaks, events verified, events written before
    the chain). Streams the events in seq order as plain rows (no model instances, no
    query per event).

    A trail of ``PARALLEL_EVENTS`` or more is cut into ranges of seq verified at once by
    ``processes`` worker processes (default: one per CPU), each on its own connection:
    a range starts from the stored hash of the event before it, so its breaks are
    the ones a single walk finds there, and they are reported in seq order. Not inside
    a transaction (other connections would not see its rows): there, one walk.
    ``chain_start``: the result of ``unchained_through()`` (read once by callers that
    verify many tasks)."""
    if chain_start is None:
        chain_start = unchained_through()
    parts = min(processes or os.cpu_count() or 1, max(1, audit_seq // (PARALLEL_EVENTS // 2)))
    if audit_seq < PARALLEL_EVENTS or parts < 2 or connection.in_atomic_block:
        with connection.cursor() as cursor:
            return _range_verify(
                cursor.cursor,
                task_id=task_id,
                audit_seq=audit_seq,
                chain_start=chain_start,
                lo=0,
                hi=_NO_SEQ,
            )
    jobs = [(task_id, audit_seq, chain_start, lo, hi) for lo, hi in _ranges(audit_seq, parts)]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        results = pool.starmap(_range_verify_apart, jobs)
    breaks = [each for found, _, _ in results for each in found]
    return breaks, sum(r[1] for r in results), sum(r[2] for r in results)


def chain_verify(
    rows: Iterable[EventRow],
    *,
    task_id: Any,
    audit_seq: int,
    chain_start: int,
    start: ChainStart | None = None,
    last: bool = True,
) -> tuple[list[Break], int, int]:
    """Check the events ``rows`` (``EventRow``, in seq order) of one task against their
    chain and the count the task recorded (``audit_seq``), wherever they come from: the
    database, or an archive (``audit.archive``). Each event's hash is over the stored
    hash of the event before it. Returns (breaks, events verified, events written before
    the chain: id up to ``chain_start``).

    ``start``: where the rows begin (default: the first event); ``last``: whether they
    run to the end of the trail (then fewer events than ``audit_seq`` is a break)."""
    first, *rotated = (Mac(k) for k in audit_keys())
    breaks: list[Break] = []
    tid = str(task_id)
    start = start or ChainStart()
    expected_seq, prev_hash = start.seq, start.prev_hash
    verified = unchained = 0
    for event_id, seq, digest, tail in rows:
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
        elif _signed(first, rotated, f'["{prev_hash}"{tail}'.encode(), digest):
            verified += 1
        elif gap:
            breaks.append(
                Break(tid, seq, "does not follow the event before it (removed)", "removed")
            )
        else:
            breaks.append(
                Break(tid, seq, "its content does not match its hash (changed)", "changed")
            )
        prev_hash, expected_seq = digest, seq + 1
    if last and expected_seq - 1 < audit_seq:
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


class Mac:
    """HMAC-SHA256 under one key (RFC 2104, the same digests as ``hmac.digest``), with
    the key's inner and outer pads hashed once: each message then costs two copies of a
    hash state, not a new HMAC context (2.5x faster on an event's few hundred bytes)."""

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # SHA-256's block
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def hexdigest(self, message: bytes) -> str:
        """The hex HMAC of ``message``."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def _signed(first: Mac, rotated: list[Mac], content: bytes, digest: str) -> bool:
    """Whether ``digest`` is the hex HMAC of ``content`` under the signing key or, less
    often, one of the rotated-out ones."""
    if first.hexdigest(content) == digest:
        return True
    return any(mac.hexdigest(content) == digest for mac in rotated)


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
