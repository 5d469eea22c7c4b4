"""``python manage.py approve TASK_ID [--reject | --edit JSON | --respond TEXT] [--comment
TEXT] [--as USERNAME]``."""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from agents.core.suspensions import task_approve
from agents_project.errors import ApplicationError


class Command(BaseCommand):
    help = (
        "Decide the approval a suspended task waits for: approve (the default), --reject, "
        "--edit ARGS (run the tool call with these arguments) or --respond TEXT (do not run "
        "it; TEXT is its result)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_id")
        decision = parser.add_mutually_exclusive_group()
        decision.add_argument("--reject", action="store_true", help="reject instead of approve")
        decision.add_argument(
            "--edit", metavar="JSON", default=None, help="the tool call's new arguments"
        )
        decision.add_argument(
            "--respond", metavar="TEXT", default=None, help="the tool call's result instead"
        )
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
        decision: dict[str, Any] = {"decision": "reject" if options["reject"] else "approve"}
        if options["edit"] is not None:
            try:
                decision = {"decision": "edit", "args": json.loads(options["edit"])}
            except json.JSONDecodeError as exc:
                raise CommandError(f"--edit: not valid JSON: {exc}") from exc
        if options["respond"] is not None:
            decision = {"decision": "respond", "message": options["respond"]}
        try:
            # Without --as the operator decides as the system, which sees every task;
            # with it, as that user, who must be allowed to see the task.
            task = task_approve(
                task_id=options["task_id"],
                user=user,
                comment=options["comment"],
                actor=None if user else "cli",
                **decision,
            )
        except ApplicationError as exc:
            where = f"{exc.field}: " if exc.field else ""
            raise CommandError(f"{where}{exc.message}") from exc
        self.stdout.write(f"{task.pk}: {task.status}")
