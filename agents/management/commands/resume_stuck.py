"""``python manage.py resume_stuck [--include-queued] [--dry-run]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from agents.core.scheduler import stuck_tasks, stuck_tasks_republish
from audit.services import process_actor


class Command(BaseCommand):
    help = (
        "List runnable tasks that nothing will run (no live lease, no message left, no "
        "retry pending) and publish their current step now, without waiting for the "
        "scheduler's sweep. --include-queued also takes the steps whose message is "
        "counted as queued: after a queue was purged or lost. Safe: a duplicate is dropped."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--include-queued",
            action="store_true",
            help="also publish steps whose message should still be in the queue",
        )
        parser.add_argument("--dry-run", action="store_true", help="only list them")

    def handle(self, *args: Any, **options: Any) -> None:
        include_queued = options["include_queued"]
        tasks = list(stuck_tasks(include_queued=include_queued)[:1000])
        for task in tasks:
            self.stdout.write(
                f"{task.pk}  {task.agent_name:<16} {task.status:<8} step {task.current_step}"
                f"  queued messages {task.in_flight}"
                f"  last progress {task.updated_at:%Y-%m-%d %H:%M:%S}"
            )
        if not tasks:
            self.stdout.write("No stuck tasks.")
            return
        if options["dry_run"]:
            return
        count = stuck_tasks_republish(
            actor=process_actor("operator"), include_queued=include_queued
        )
        self.stdout.write(f"Published the current step of {count} task(s) again.")
