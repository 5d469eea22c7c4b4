"""``python manage.py audit_partitions``: the audit trail's monthly partitions
(``audit.partitions``; PostgreSQL).

    audit_partitions [list]                          each partition, its range, rows, bytes
    audit_partitions ensure [--months-ahead N] [--since YYYY-MM]
                                                     make the missing month partitions
    audit_partitions retire [--dry-run] [--batch N]  drop the ended months whose tasks
                                                     are all removed (what retention's
                                                     periodic run does after its tasks)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from agents.core import clock
from agents.retention import partition_purge_after
from audit.partitions import (
    MONTHS_AHEAD,
    partitioned,
    partitions_ensure,
    partitions_list,
    partitions_retire,
)
from audit.services import process_actor


def _month(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
    except ValueError as exc:
        raise CommandError(f"--since: {text!r} is not YYYY-MM") from exc


class Command(BaseCommand):
    help = (
        "The audit trail's monthly partitions: list them, make the coming ones (ensure), "
        "or drop the ended months whose tasks are all removed (retire)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "action", nargs="?", default="list", choices=("list", "ensure", "retire")
        )
        parser.add_argument("--months-ahead", type=int, default=MONTHS_AHEAD)
        parser.add_argument("--since", default=None, help="ensure: the first month (YYYY-MM)")
        parser.add_argument("--dry-run", action="store_true", help="retire: report only")
        parser.add_argument("--batch", type=int, default=20, help="retire: tasks purged by rows")

    def handle(self, *args: Any, **options: Any) -> None:
        if not partitioned():
            raise CommandError("the audit trail is not partitioned here (PostgreSQL only)")
        action = options["action"]
        try:
            if action == "ensure":
                since = _month(options["since"]) if options["since"] else None
                made = partitions_ensure(
                    now=clock.now(), months_ahead=options["months_ahead"], since=since
                )
                for name in made:
                    self.stdout.write(f"made {name}")
                self.stdout.write(f"{len(made)} partition(s) made")
            elif action == "retire":
                self._retire(options)
            else:
                for part in partitions_list():
                    span = (
                        f"{part.start:%Y-%m-%d} .. {part.end:%Y-%m-%d}"
                        if part.start and part.end
                        else "DEFAULT"
                    )
                    rows = "?" if part.rows < 0 else f"~{part.rows}"
                    self.stdout.write(f"{part.name}  {span}  {rows} rows  {part.bytes} bytes")
        except DatabaseError as exc:
            raise CommandError(str(exc)) from exc

    def _retire(self, options: dict[str, Any]) -> None:
        report = partitions_retire(
            now=clock.now(),
            actor=process_actor("command"),
            purge_after=partition_purge_after(),
            batch=options["batch"],
            dry_run=options["dry_run"],
        )
        verb = "would drop" if options["dry_run"] else "dropped"
        for name, events in report.dropped.items():
            self.stdout.write(f"{verb} {name} ({events} events)")
        for name, tasks in report.purged.items():
            self.stdout.write(f"purged by rows in {name}: {tasks} removed task(s)")
        for name in report.waiting:
            self.stdout.write(f"waiting: {name} (holds tasks still in the database)")
        for name in report.busy:
            self.stderr.write(f"not dropped now: {name} (lock not had in time; next run)")
