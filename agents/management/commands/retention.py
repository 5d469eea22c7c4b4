"""``python manage.py retention``: archive and remove finished tasks by policy
(``agents.retention``), hold tasks, and read archives.

    retention [--dry-run] [--batch N]        one run (what the workers do on a schedule)
    retention hold TASK_ID [--reason TEXT]   put a task under legal hold (audited)
    retention release TASK_ID [--reason TEXT]
    retention show ARCHIVE [--json]          verify an archive and print its task and
                                             audit trail (read-only; a path or a name
                                             in STORAGES["retention"])
    retention restore ARCHIVE                put the archived task back, under legal
                                             hold, for an investigation
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from django.core.files.storage import storages
from django.core.management.base import BaseCommand, CommandError

from agents.retention import retention_run, task_legal_hold_set, task_restore
from agents_project.errors import ApplicationError
from audit.archive import EVENT, TASK, ArchiveError, archive_records, archive_verify
from audit.models import AuditEvent
from audit.services import process_actor
from audit.timeline import render

ACTIONS = ("run", "hold", "release", "show", "restore")


def archive_open(where: str) -> IO[bytes]:
    """An archive by file path, or by its name in ``STORAGES["retention"]``."""
    if Path(where).is_file():
        return open(where, "rb")  # noqa: SIM115 - the caller closes it
    storage = storages["retention"]
    if not storage.exists(where):
        raise CommandError(f"ARCHIVE: no file {where} (neither a path nor a stored name)")
    return storage.open(where, "rb")


class Command(BaseCommand):
    help = (
        "Archive and remove finished tasks by AGENTS_RETENTION (--dry-run lists them); "
        "'hold'/'release' TASK_ID; 'show'/'restore' ARCHIVE."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "action",
            nargs="?",
            default="run",
            choices=("run", "hold", "release", "show", "restore"),
        )
        parser.add_argument("target", nargs="?", help="TASK_ID (hold, release) or ARCHIVE (show)")
        parser.add_argument("--dry-run", action="store_true", help="list, change nothing")
        parser.add_argument("--batch", type=int, default=None, help="tasks in this run")
        parser.add_argument("--reason", default="", help="why a hold is set or released")
        parser.add_argument("--json", action="store_true", help="show: the records as JSON lines")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action != "run" and not options["target"]:
            wanted = "TASK_ID" if action in ("hold", "release") else "ARCHIVE"
            raise CommandError(f"retention {action}: give a {wanted}")
        if action == "run":
            self._run(options)
        elif action == "show":
            self._show(options["target"], as_json=options["json"])
        elif action == "restore":
            try:
                with archive_open(options["target"]) as source:
                    task = task_restore(
                        source=source, archive=options["target"], actor=process_actor("command")
                    )
            except (ApplicationError, ArchiveError) as exc:
                raise CommandError(f"ARCHIVE: {exc}") from exc
            self.stdout.write(
                f"task {task.pk} restored under legal hold ({task.audit_seq} audit events); "
                f"release it with: retention release {task.pk}"
            )
        else:
            try:
                task = task_legal_hold_set(
                    task_id=options["target"],
                    held=action == "hold",
                    reason=options["reason"],
                )
            except (ApplicationError, ValueError) as exc:
                raise CommandError(str(exc)) from exc
            state = "under legal hold" if task.legal_hold else "released from legal hold"
            self.stdout.write(f"task {task.pk} {state}")

    def _run(self, options: dict[str, Any]) -> None:
        batch = options["batch"]
        if batch is not None and batch < 1:
            raise CommandError("--batch: must be 1 or more")
        report = retention_run(batch=batch, dry_run=options["dry_run"])
        verb = "would drop" if options["dry_run"] else "dropped"
        for name, events in report.partitions.dropped.items():
            self.stdout.write(f"{verb} audit partition {name} ({events} events)")
        if options["dry_run"]:
            for task_id, mode in report.would:
                self.stdout.write(f"would {mode}: {task_id}")
            self.stdout.write(f"{len(report.would)} task(s) due (dry run: nothing changed)")
            return
        for task_id in report.failed:
            self.stderr.write(f"archive did not verify, task kept: {task_id}")
        self.stdout.write(
            f"{len(report.removed)} removed, {len(report.pruned)} pruned, "
            f"{len(report.skipped)} skipped, {len(report.failed)} failed"
        )
        if report.failed:
            raise CommandError(f"{len(report.failed)} archive(s) did not verify")

    def _show(self, where: str, *, as_json: bool) -> None:
        try:
            with archive_open(where) as source:
                report = archive_verify(source)
            with archive_open(where) as source:
                records = list(archive_records(source)) if as_json else None
                if records is not None:
                    for record in records:
                        self.stdout.write(json.dumps(record, ensure_ascii=False))
                    return
            with archive_open(where) as source:
                self._print(archive_records(source))
        except ArchiveError as exc:
            raise CommandError(f"ARCHIVE: {exc}") from exc
        for found in report.breaks:
            self.stderr.write(str(found))
        state = "intact" if not report.breaks else f"{len(report.breaks)} break(s)"
        self.stdout.write(f"archive {state}: {report.verified} event(s) verified")

    def _print(self, records: Any) -> None:
        events = []
        for record in records:
            fields = record.get("fields") or {}
            if record.get("record") == TASK:
                self.stdout.write(
                    f"task {fields['id']}  {fields['agent_name']} {fields['agent_version']}  "
                    f"{fields['status']}  owner {fields.get('owner')}  "
                    f"finished {fields['finished_at']}"
                )
            elif record.get("record") == EVENT:
                events.append(
                    AuditEvent(
                        task_id=fields["task_id"],
                        seq=fields["seq"],
                        type=fields["type"],
                        step=fields["step"],
                        payload=fields["payload"],
                        actor=fields["actor"],
                        created_at=datetime.fromisoformat(fields["created_at"]),
                    )
                )
        self.stdout.write(render(events))
