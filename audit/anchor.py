"""Anchoring the audit chain outside the database, so that a cut tail is found.

The hash chain (``audit.integrity``) shows an edited, inserted or blanked event, but not
the removal of a task's last events by someone who also lowers the task's count: what is
left is a consistent, shorter chain. So at intervals (``manage.py audit_anchor
--every``) the head of every task that got events since the last anchor, ``(seq,
hash)``, is written as one signed JSON line to a log the app's database role cannot
rewrite (a file on a volume only the anchor process mounts, or its standard output
shipped to a log store). ``audit_verify --anchors FILE`` then checks that each
anchored head is still there, with the anchored hash.

A line is ``{"v": 1, "at": ISO time, "after_id": N, "through_id": M, "heads": {task id:
[seq, hash]}, "sig": hex}``: the heads of the events with ids in ``(N, M]``, and
``sig`` the HMAC-SHA256 of the rest under the chain's signing key (``AGENTS_AUDIT_KEY``),
checked with any configured key. ``M`` is the largest id of an event older than
``ANCHOR_LAG`` (a transaction still open then is assumed to have ended), so an event
committed after its anchor is taken by the next one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Max
from django.utils import timezone

from audit.integrity import Break, audit_keys
from audit.models import AuditEvent, TaskRemoval

# Events younger than this are left to the next anchor (their transaction may be open).
ANCHOR_LAG = timedelta(seconds=30)
ANCHOR_LOG = "anchor log"


def _signature(record: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in record.items() if k != "sig"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def anchor_make(
    *, after_id: int, now: datetime | None = None, lag: timedelta = ANCHOR_LAG
) -> dict[str, Any] | None:
    """The signed anchor of the events with ids above ``after_id`` and older than
    ``lag``: each of their tasks' last ``(seq, hash)``. ``None`` when there are
    none (nothing to anchor)."""
    now = now or timezone.now()
    through = AuditEvent.objects.filter(id__gt=after_id, created_at__lt=now - lag).aggregate(
        last=Max("id")
    )["last"]
    if through is None:
        return None
    heads: dict[str, list[Any]] = {}
    rows = (
        AuditEvent.objects.filter(id__gt=after_id, id__lte=through)
        .order_by("task_id", "-seq")
        .distinct("task_id")
        .values_list("task_id", "seq", "hash")
    )
    for task_id, seq, digest in rows.iterator(chunk_size=2000):
        heads[str(task_id)] = [seq, digest]
    record: dict[str, Any] = {
        "v": 1,
        "at": now.isoformat(),
        "after_id": after_id,
        "through_id": through,
        "heads": heads,
    }
    record["sig"] = _signature(record, audit_keys()[0])
    return record


def anchor_line(record: dict[str, Any]) -> str:
    """One anchor as the line written to the log (no newline)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def anchors_read(lines: Iterable[str]) -> tuple[list[dict[str, Any]], list[Break]]:
    """Parse an anchor log: (anchors whose signature verifies, a ``forged-anchor``
    break for each line that is not a valid anchor or whose signature does not verify
    under any configured key, and for a removed line: each anchor starts where the one
    before it ended, or at 0 when the anchor process started over). Lines that do not
    start with ``{`` are skipped: log lines mixed into the same output (``--to -``)."""
    keys = audit_keys()
    anchors: list[dict[str, Any]] = []
    breaks: list[Break] = []
    through = 0
    for number, line in enumerate(lines, start=1):
        if not line.lstrip().startswith("{"):
            continue  # not an anchor: a log line of the same output, or a blank one
        try:
            record = json.loads(line)
            sig = str(record["sig"])
            ok = any(hmac.compare_digest(_signature(record, key), sig) for key in keys)
            record["heads"].items()  # noqa: B018 - the shape is part of the check
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            breaks.append(
                Break(
                    ANCHOR_LOG,
                    number,
                    "not a valid anchor, or its signature does not verify (the anchor "
                    "log was edited, or its key is no longer in AGENTS_AUDIT_KEY)",
                    "forged-anchor",
                )
            )
            continue
        after = int(record.get("after_id", 0))
        if after not in (0, through):  # 0: the anchor process started over
            breaks.append(
                Break(
                    ANCHOR_LOG,
                    number,
                    f"starts after event id {after}, but the anchor before it ended at "
                    f"{through} (an anchor line was removed)",
                    "forged-anchor",
                )
            )
        through = int(record["through_id"])
        anchors.append(record)
    return anchors, breaks


def anchor_last_through(lines: Iterable[str]) -> int:
    """The ``through_id`` of the last valid anchor in a log (0 for none): where the next
    anchor starts."""
    anchors, _ = anchors_read(lines)
    return max((int(a["through_id"]) for a in anchors), default=0)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def anchors_verify(anchors: Iterable[dict[str, Any]]) -> tuple[list[Break], int]:
    """Check every task's latest anchored head against the trail. Returns (breaks,
    heads checked): ``cut`` when the anchored event is gone (the tail was removed),
    ``rewritten`` when it is there with another hash."""
    latest: dict[str, tuple[int, str, str]] = {}
    for anchor in anchors:
        for task_id, (seq, digest) in anchor["heads"].items():
            if task_id not in latest or seq > latest[task_id][0]:
                latest[task_id] = (int(seq), str(digest), str(anchor["at"]))
    breaks: list[Break] = []
    for chunk in _chunks(sorted(latest), 500):
        found = {
            (str(task_id), seq): digest
            for task_id, seq, digest in AuditEvent.objects.filter(
                task_id__in=chunk, seq__in={latest[t][0] for t in chunk}
            ).values_list("task_id", "seq", "hash")
        }
        ends: dict[str, int] = {
            str(task_id): last
            for task_id, last in AuditEvent.objects.filter(task_id__in=chunk)
            .values("task_id")
            .annotate(last=Max("seq"))
            .values_list("task_id", "last")
        }
        # Tasks removed by retention: their anchored head is checked against the head
        # their removal record kept (the events themselves are in the archive).
        removed = {
            str(task_id): (head_seq, head_hash)
            for task_id, head_seq, head_hash in TaskRemoval.objects.filter(
                task_id__in=[t for t in chunk if t not in ends]
            )
            .order_by("seq")
            .values_list("task_id", "head_seq", "head_hash")
        }
        for task_id in chunk:
            seq, digest, at = latest[task_id]
            stored = found.get((task_id, seq))
            if stored is None and task_id in removed:
                head_seq, head_hash = removed[task_id]
                if head_seq < seq:
                    breaks.append(
                        Break(
                            task_id,
                            seq,
                            f"anchored at {at}, but removed by retention "
                            f"with its trail ending at #{head_seq} (cut before removal)",
                            "cut",
                        )
                    )
                elif head_seq == seq and not hmac.compare_digest(head_hash, digest):
                    breaks.append(
                        Break(
                            task_id,
                            seq,
                            f"its hash is not the one anchored at {at} (the "
                            "chain was rewritten before removal)",
                            "rewritten",
                        )
                    )
                continue
            if stored is None:
                breaks.append(
                    Break(
                        task_id,
                        seq,
                        f"anchored at {at}, but the trail now ends at "
                        f"#{ends.get(task_id, 0)} (the events after it were removed)",
                        "cut",
                    )
                )
            elif not hmac.compare_digest(stored, digest):
                breaks.append(
                    Break(
                        task_id,
                        seq,
                        f"its hash is not the one anchored at {at} (the chain was "
                        "rewritten up to here)",
                        "rewritten",
                    )
                )
    return breaks, len(latest)
