"""``python manage.py audit_verify [TASK_ID | --all] [--anchors FILE]``: check the audit
trail's hash chain, and the heads anchored in FILE (``manage.py audit_anchor``); with
``--all``, also the chain of retention's removal records (``audit.models.TaskRemoval``).

``audit_verify --archive PATH``: check a task's archive (``audit.archive``) from the
file alone, with no database: its signed end record and its events' hash chain.

Each break is printed with its kind in brackets: ``changed``, ``removed``, ``inserted``,
``unsealed``, ``cut``, ``rewritten``, ``forged-anchor`` (``audit.integrity.Break``).
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agents.models import AgentTask
from agents.selectors import task_get
from agents_project.errors import ApplicationError
from audit.anchor import anchors_read, anchors_verify
from audit.archive import ArchiveError, archive_verify
from audit.integrity import Break, removals_verify
from audit.services import audit_verify


class Command(BaseCommand):
    help = (
        "Verify that a task's audit events (or every task's, --all) are the ones written: "
        "none changed, removed or inserted. Exits 1 and lists each break if not."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_id", nargs="?")
        parser.add_argument("--all", action="store_true", help="every task")
        parser.add_argument(
            "--archive",
            action="extend",
            nargs="+",
            default=[],
            metavar="PATH",
            help="verify task archive files offline, from the files alone",
        )
        parser.add_argument(
            "--anchors",
            default=None,
            help="an anchor log (audit_anchor --to): every anchored head must still be there "
            "(default AGENTS_AUDIT_ANCHOR_FILE)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["archive"]:
            if options["task_id"] or options["all"]:
                raise CommandError("--archive: give archives alone (no TASK_ID or --all)")
            self._archives(options["archive"])
            return
        if bool(options["task_id"]) == bool(options["all"]):
            raise CommandError("give a TASK_ID or --all (not both)")
        tasks = AgentTask.objects.order_by("created_at", "id")
        if options["task_id"]:
            try:
                tasks = tasks.filter(pk=task_get(task_id=options["task_id"], user=None).pk)
            except ApplicationError as exc:
                raise CommandError(exc.message) from exc
        report = audit_verify(tasks=tasks.values_list("id", "audit_seq").iterator(chunk_size=500))
        breaks = list(report.breaks)
        removals = ""
        if options["all"]:
            removal_breaks, checked = removals_verify()
            breaks += removal_breaks
            removals = f", {checked} removal record(s)"
        anchored = ""
        anchor_file = options["anchors"] or settings.AGENTS["AUDIT_ANCHOR_FILE"]
        if anchor_file and not options["anchors"] and not os.path.exists(anchor_file):
            self.stderr.write(f"no anchor log at {anchor_file} yet: heads not checked")
            anchor_file = ""
        if anchor_file:
            try:
                with open(anchor_file, encoding="utf-8") as log:
                    anchors, forged = anchors_read(log)
            except OSError as exc:
                raise CommandError(f"--anchors: {exc}") from exc
            if options["task_id"]:
                only = str(tasks.get().pk)
                anchors = [
                    {**a, "heads": {t: h for t, h in a["heads"].items() if t == only}}
                    for a in anchors
                ]
            cut, heads = anchors_verify(anchors)
            breaks += forged + cut
            anchored = f", {heads} anchored head(s) checked"
        for found in breaks:
            self.stderr.write(str(found))
        summary = (
            f"{report.tasks} task(s), {report.verified} event(s) verified, "
            f"{report.unverifiable} written before the chain{removals}{anchored}, "
            f"{len(breaks)} break(s)"
        )
        if breaks:
            raise CommandError(f"audit trail broken: {summary}")
        self.stdout.write(f"audit trail intact: {summary}")

    def _archives(self, paths: list[str]) -> None:
        breaks: list[Break] = []
        verified = 0
        for path in paths:
            try:
                with open(path, "rb") as source:
                    report = archive_verify(source)
            except (OSError, ArchiveError) as exc:
                raise CommandError(f"--archive {path}: {exc}") from exc
            breaks += report.breaks
            verified += report.verified
        for each in breaks:
            self.stderr.write(str(each))
        summary = f"{len(paths)} archive(s), {verified} event(s) verified, {len(breaks)} break(s)"
        if breaks:
            raise CommandError(f"archive broken: {summary}")
        self.stdout.write(f"archive intact: {summary}")
