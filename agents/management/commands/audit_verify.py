"""``python manage.py audit_verify [TASK_ID | --all]``: check the audit trail's hash chain."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents.models import AgentTask
from agents.selectors import task_get
from agents_project.errors import ApplicationError
from audit.services import audit_verify


class Command(BaseCommand):
    help = (
        "Verify that a task's audit events (or every task's, --all) are the ones written: "
        "none changed, removed or inserted. Exits 1 and lists each break if not."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_id", nargs="?")
        parser.add_argument("--all", action="store_true", help="every task")

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
        for found in report.breaks:
            self.stderr.write(str(found))
        summary = (
            f"{report.tasks} task(s), {report.verified} event(s) verified, "
            f"{report.unverifiable} written before the chain, {len(report.breaks)} break(s)"
        )
        if report.breaks:
            raise CommandError(f"audit trail broken: {summary}")
        self.stdout.write(f"audit trail intact: {summary}")
