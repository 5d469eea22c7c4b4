"""``python manage.py replay TASK_ID [--from-step N]``: run a task again from a checkpoint."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents.services import task_replay
from agents_project.errors import ApplicationError


class Command(BaseCommand):
    help = (
        "Start a new task from a checkpoint of TASK_ID (default: its latest) and print the "
        "new task's id. The original task is left as it was."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_id")
        parser.add_argument(
            "--from-step", type=int, default=None, help="the checkpoint (step number) to start from"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            task = task_replay(
                task_id=options["task_id"], user=None, from_step=options["from_step"]
            )
        except ApplicationError as exc:
            field = f"{exc.field}: " if exc.field else ""
            raise CommandError(f"{field}{exc.message}") from exc
        self.stdout.write(str(task.pk))
        self.stderr.write(
            f"replay of {task.replayed_from_id} from checkpoint {task.replayed_from_step}; "
            f"it runs step {task.current_step} next"
        )
