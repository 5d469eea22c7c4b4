"""``python manage.py audit_verify [TASK_ID | --all] [--anchors FILE]``: check the audit
trail's hash chain, and the heads anchored in FILE (``manage.py audit_anchor``).

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
            "--anchors",
            default=None,
            help="an anchor log (audit_anchor --to): every anchored head must still be there "
            "(default AGENTS_AUDIT_ANCHOR_FILE)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
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
            f"{report.unverifiable} written before the chain{anchored}, {len(breaks)} break(s)"
        )
        if breaks:
            raise CommandError(f"audit trail broken: {summary}")
        self.stdout.write(f"audit trail intact: {summary}")
