"""``python manage.py resume_stuck [--older-than SECONDS] [--dry-run]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from agents.scheduler import stuck_tasks, stuck_tasks_republish
from audit.services import process_actor


class Command(BaseCommand):
    help = (
        "List pending or running tasks without progress for a while (their step message "
        "may be lost) and publish their current step again. Safe: a duplicate is dropped."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--older-than",
            type=float,
            default=None,
            help="seconds without progress (default: AGENTS_STUCK_AFTER)",
        )
        parser.add_argument("--dry-run", action="store_true", help="only list them")

    def handle(self, *args: Any, **options: Any) -> None:
        older_than = options["older_than"]
        tasks = list(stuck_tasks(stuck_after=older_than)[:1000])
        for task in tasks:
            self.stdout.write(
                f"{task.pk}  {task.agent_name:<16} {task.status:<8} step {task.current_step}"
                f"  last progress {task.updated_at:%Y-%m-%d %H:%M:%S}"
            )
        if not tasks:
            self.stdout.write("No stuck tasks.")
            return
        if options["dry_run"]:
            return
        count = stuck_tasks_republish(actor=process_actor("operator"), stuck_after=older_than)
        self.stdout.write(f"Published the current step of {count} task(s) again.")
