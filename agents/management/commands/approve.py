"""``python manage.py approve TASK_ID [--reject] [--comment TEXT] [--as USERNAME]``."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from agents.core.suspensions import task_approve
from agents_project.errors import ApplicationError


class Command(BaseCommand):
    help = "Decide the approval a suspended task waits for (approve, or --reject)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_id")
        parser.add_argument("--reject", action="store_true", help="reject instead of approve")
        parser.add_argument("--comment", default="", help="recorded with the decision")
        parser.add_argument(
            "--as", dest="username", default=None, help="the deciding user (recorded)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user = None
        if options["username"]:
            user = get_user_model().objects.filter(username=options["username"]).first()
            if user is None:
                raise CommandError(f"--as: no user {options['username']!r}")
        try:
            # Without --as the operator decides as the system, which sees every task;
            # with it, as that user, who must be allowed to see the task.
            task = task_approve(
                task_id=options["task_id"],
                user=user,
                approved=not options["reject"],
                comment=options["comment"],
                actor=None if user else "cli",
            )
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"{task.pk}: {task.status}")
