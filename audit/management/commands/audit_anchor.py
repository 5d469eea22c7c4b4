"""``python manage.py audit_anchor [--to FILE] [--every SECONDS]``: anchor the audit chain.

Appends one signed line with the head of every task that got events since the last
anchor in FILE (``-``: standard output, for a log store) (``audit.anchor``). Run it
where the app's database role cannot rewrite FILE: docker/compose.yaml runs it as its
own service with a volume no other service mounts.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from audit.anchor import ANCHOR_LAG, anchor_last_through, anchor_line, anchor_make

logger = structlog.get_logger(__name__)


class Command(BaseCommand):
    help = (
        "Append the signed heads of the audit chain (every task with events since the "
        "last anchor) to FILE, once or every SECONDS; audit_verify --anchors FILE checks them."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--to",
            default=None,
            help="the anchor log to append to (- : stdout; default AGENTS_AUDIT_ANCHOR_FILE)",
        )
        parser.add_argument(
            "--every", type=float, default=0, help="seconds between anchors (0: once)"
        )
        parser.add_argument(
            "--lag",
            type=float,
            default=ANCHOR_LAG.total_seconds(),
            help="leave events younger than this many seconds to the next anchor",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        target: str = options["to"] or settings.AGENTS["AUDIT_ANCHOR_FILE"]
        if not target:
            raise CommandError("--to: give the anchor log (or set AGENTS_AUDIT_ANCHOR_FILE)")
        every: float = options["every"]
        if every < 0:
            raise CommandError("--every: must be 0 or more seconds")
        after_id = 0
        if target != "-":
            path = Path(target)
            if path.exists():
                with path.open(encoding="utf-8") as log:
                    after_id = anchor_last_through(log)
        while True:
            record = anchor_make(after_id=after_id, lag=timedelta(seconds=options["lag"]))
            if record is not None:
                self._append(target, anchor_line(record))
                after_id = record["through_id"]
                if target != "-":  # stdout carries only anchors
                    logger.info(
                        "audit chain anchored", through_id=after_id, tasks=len(record["heads"])
                    )
            if not every:
                return
            time.sleep(every)

    def _append(self, target: str, line: str) -> None:
        if target == "-":
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
