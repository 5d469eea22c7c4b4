"""``python manage.py requeue_dead_letters [--task TASK_ID | --all]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents.core.dead_letters import dead_letter_requeue
from agents.selectors import dead_letters_visible_to, parse_task_id
from agents_project.errors import ApplicationError
from audit.services import process_actor


class Command(BaseCommand):
    help = (
        "Send dead-lettered tasks back to work from their last checkpoint: one task's "
        "(--task) or every open dead letter (--all). Without either, list the open ones."
    )

    def add_arguments(self, parser: Any) -> None:
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--task", metavar="TASK_ID", help="requeue this task's dead letter")
        which.add_argument("--all", action="store_true", help="requeue every open dead letter")

    def handle(self, *args: Any, **options: Any) -> None:
        task_id = None
        if options["task"]:
            try:
                task_id = parse_task_id(options["task"])
            except ApplicationError as exc:
                raise CommandError(exc.message) from exc
        letters = list(dead_letters_visible_to(None, open=True, task_id=task_id).order_by("id"))
        if not options["task"] and not options["all"]:
            for letter in letters:
                self.stdout.write(
                    f"{letter.pk}  task {letter.task_id}  step {letter.step}  "
                    f"{letter.reason}  {letter.error[:80]}"
                )
            self.stderr.write(f"{len(letters)} open dead letter(s); --all to requeue them")
            return
        if task_id is not None and not letters:
            raise CommandError(f"task {task_id} has no open dead letter")
        actor = process_actor("cli")
        failed = 0
        for letter in letters:
            try:
                task = dead_letter_requeue(dead_letter_id=letter.pk, actor=actor)
            except ApplicationError as exc:
                failed += 1
                self.stderr.write(f"dead letter {letter.pk}: {exc.message}")
                continue
            self.stdout.write(str(task.pk))
        self.stderr.write(f"{len(letters) - failed} requeued, {failed} refused")
        if failed:
            raise CommandError(f"{failed} dead letter(s) could not be requeued")
