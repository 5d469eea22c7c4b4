"""The task archive: one task and everything that refers to it, as an ordinary file.

Written by retention (``agents.retention``) before a task leaves the hot tables, read
back by ``audit_verify --archive`` and ``retention show|restore``. The format, version 1
(README, "Retention and archival"): gzip-compressed UTF-8 JSON lines, one object per
line, each with a ``record`` key:

1. ``{"record": "archive", "format": "agents-task-archive", "version": 1, "task_id": ID}``
2. ``{"record": "agents.agenttask", "fields": {...}}``: the task row, every column by its
   attribute name (``owner_id``), plus ``"owner": USERNAME``.
3. one line per row of each table that refers to the task, ``record`` being the
   model's label (``agents.checkpoint``, ``audit.auditevent``, ``llm.message``,
   ``tools.ledgerentry``, ...), ``fields`` its columns, in primary-key order (audit
   events in ``seq`` order). Times are ISO 8601 with microseconds and offset, decimals
   and UUIDs strings, bytes hex; an audit event's ``hash`` is the 64-character hex
   HMAC-SHA256 of ``audit.integrity``, over the ``hash`` of the event before it
   (archives written before migration ``audit.0010`` also carry that as ``prev_hash``).
4. ``{"record": "end", "lines": N, "counts": {label: rows}, "head": [seq, hash],
   "sha256": HEX, "sig": HEX}``: ``sha256`` of the N lines before it (their bytes,
   each with its newline), ``head`` the last audit event, and ``sig`` the keyed hash
   (``audit.integrity.record_hash``, the chain's key) of the rest, so the file cannot
   be cut or edited without the key.

The bytes are deterministic (no time in the gzip header, rows in a fixed order): the
same task archived twice gives the same file, which makes an interrupted run's second
archive of a task idempotent.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import IO, Any
from uuid import UUID

from audit.integrity import (
    Break,
    EventRow,
    audit_keys,
    canonical_payload,
    chain_verify,
    record_hash,
    row_tail,
)

FORMAT = "agents-task-archive"
VERSION = 1
TASK = "agents.agenttask"
EVENT = "audit.auditevent"
END = "end"


class ArchiveError(ValueError):
    """The file is not a task archive this code can read (names what is wrong)."""


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    raise TypeError(f"cannot archive a {type(value).__name__}")


_ENCODE = json.JSONEncoder(
    default=_default, ensure_ascii=False, separators=(",", ":"), sort_keys=True
).encode


def _end_content(
    task_id: str, lines: int, counts: dict[str, int], head: list[Any], sha: str
) -> list[Any]:
    return [FORMAT, VERSION, task_id, lines, counts, head, sha]


class ArchiveWriter:
    """Writes one task's archive to ``out`` (a binary file), line by line: ``write``
    each record (the task's first), then ``close`` adds the signed end record."""

    def __init__(self, out: IO[bytes], *, task_id: Any) -> None:
        self.task_id = str(task_id)
        self._gzip = gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6)
        self._sha = hashlib.sha256()
        self.lines = 0
        self.counts: dict[str, int] = {}
        self.head: list[Any] = [0, ""]
        self._line(
            {"record": "archive", "format": FORMAT, "version": VERSION, "task_id": self.task_id}
        )

    def _line(self, obj: dict[str, Any]) -> None:
        data = (_ENCODE(obj) + "\n").encode("utf-8")
        self._sha.update(data)
        self._gzip.write(data)
        self.lines += 1

    def write(self, record: str, fields: dict[str, Any]) -> None:
        """One row: ``record`` its model's label, ``fields`` its columns."""
        self._line({"record": record, "fields": fields})
        self.counts[record] = self.counts.get(record, 0) + 1
        if record == EVENT:
            digest = fields["hash"]
            self.head = [
                fields["seq"],
                bytes(digest).hex() if isinstance(digest, bytes | memoryview) else digest or "",
            ]

    def close(self) -> str:
        """Write the end record and finish the gzip stream; returns the content's SHA-256."""
        sha = self._sha.hexdigest()
        content = _end_content(self.task_id, self.lines, self.counts, self.head, sha)
        end = {
            "record": END,
            "lines": self.lines,
            "counts": self.counts,
            "head": self.head,
            "sha256": sha,
            "sig": record_hash(prev_hash="", content=content),
        }
        self._gzip.write((_ENCODE(end) + "\n").encode("utf-8"))
        self._gzip.close()
        return sha


def archive_lines(source: IO[bytes]) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Every line of an archive, in order, as (its bytes, its record); ``ArchiveError``
    when it is not gzip-compressed JSON lines."""
    try:
        with gzip.GzipFile(fileobj=source, mode="rb") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    yield line, json.loads(line)
                except ValueError as exc:
                    raise ArchiveError(f"line {number}: not JSON ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise ArchiveError(f"not a gzip-compressed archive ({exc})") from exc


def archive_records(source: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Every record of an archive, in order (``archive_lines`` without the bytes)."""
    for _, record in archive_lines(source):
        yield record


def event_row(fields: dict[str, Any], *, task_id: str) -> EventRow:
    """An archived event's fields as the row ``audit.integrity.chain_verify`` reads (an
    archive written before migration ``audit.0010`` also has the event's ``prev_hash``,
    the hash of the line before, which the end record's signature covers: not read)."""
    seq = fields.get("seq")
    tail = row_tail(
        task_id,
        seq,  # type: ignore[arg-type]
        fields.get("type"),  # type: ignore[arg-type]
        fields.get("step"),
        fields.get("actor"),  # type: ignore[arg-type]
        fields.get("created_at"),  # type: ignore[arg-type]
        canonical_payload(fields.get("payload")),
    )
    return fields.get("id"), seq, fields.get("hash") or "", tail  # type: ignore[return-value]


@dataclass
class ArchiveReport:
    """What ``archive_verify`` found: the task, its rows per label, the events whose
    hash verified, and every break (``audit.integrity.Break``)."""

    task_id: str = ""
    task: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    verified: int = 0
    unverifiable: int = 0
    head: list[Any] = field(default_factory=lambda: [0, ""])
    sha256: str = ""
    breaks: list[Break] = field(default_factory=list)


def archive_verify(source: IO[bytes], *, chain_start: int = 0) -> ArchiveReport:
    """Check an archive from the file alone: its end record (signature, line count,
    SHA-256 of the lines, rows per label) and the audit events' hash chain against the
    task's ``audit_seq`` (``audit.integrity.chain_verify``). Streams the file once.
    Raises ``ArchiveError`` when it is not an archive at all; a damaged one is a report
    with breaks (``changed``, ``removed``, ``inserted``, ``cut``)."""
    report = ArchiveReport()
    sha = hashlib.sha256()
    lines = 0
    end: dict[str, Any] | None = None
    records = archive_lines(source)
    try:
        raw, header = next(records)
    except StopIteration:
        raise ArchiveError("empty file") from None
    if header.get("record") != "archive" or header.get("format") != FORMAT:
        raise ArchiveError(f"line 1: not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise ArchiveError(f"line 1: version {header.get('version')!r}, this code reads {VERSION}")
    report.task_id = str(header.get("task_id"))

    def account(line: bytes) -> None:
        nonlocal lines
        sha.update(line)
        lines += 1

    account(raw)

    def events() -> Iterator[EventRow]:
        nonlocal end
        for line, record in records:
            kind = str(record.get("record"))
            if kind == END:
                end = record
                continue
            if end is not None:
                report.breaks.append(
                    Break(report.task_id, None, "lines after the end record (inserted)", "inserted")
                )
            account(line)
            report.counts[kind] = report.counts.get(kind, 0) + 1
            fields = record.get("fields") or {}
            if kind == TASK:
                report.task = fields
            elif kind == EVENT:
                report.head = [fields.get("seq"), fields.get("hash") or ""]
                yield event_row(fields, task_id=report.task_id)

    rows = events()
    # The task's line comes before its events: read up to the first event to learn how
    # many events the task counted.
    first = next(rows, None)
    audit_seq = int(report.task.get("audit_seq", 0))
    chained: Iterable[EventRow] = rows if first is None else _prepend(first, rows)
    found, report.verified, report.unverifiable = chain_verify(
        chained, task_id=report.task_id, audit_seq=audit_seq, chain_start=chain_start
    )
    report.breaks.extend(found)
    report.sha256 = sha.hexdigest()
    report.breaks.extend(_end_breaks(report, end, lines))
    return report


def _prepend(first: EventRow, rest: Iterator[EventRow]) -> Iterator[EventRow]:
    yield first
    yield from rest


def _end_breaks(report: ArchiveReport, end: dict[str, Any] | None, lines: int) -> list[Break]:
    tid = report.task_id
    if not report.task:
        return [Break(tid, None, "the archive has no task record (removed)", "removed")]
    if end is None:
        return [Break(tid, None, "the archive ends before its end record (cut)", "cut")]
    breaks = []
    content = _end_content(
        tid, end.get("lines", -1), end.get("counts", {}), end.get("head", []), end.get("sha256", "")
    )
    keys = audit_keys()
    if not any(
        hmac.compare_digest(
            record_hash(prev_hash="", content=content, key=key), str(end.get("sig"))
        )
        for key in keys
    ):
        breaks.append(
            Break(tid, None, "the end record's signature does not verify (edited)", "changed")
        )
    if end.get("lines") != lines or end.get("sha256") != report.sha256:
        breaks.append(
            Break(
                tid,
                None,
                f"the archive's {lines} lines are not the {end.get('lines')} it was written "
                "with (SHA-256 differs: a line was changed, removed or inserted)",
                "changed",
            )
        )
    if end.get("counts") != report.counts:
        breaks.append(
            Break(
                tid,
                None,
                f"rows per kind {report.counts} differ from those written {end.get('counts')}",
                "changed",
            )
        )
    return breaks
