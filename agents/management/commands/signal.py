"""``python manage.py signal TASK_ID NAME [--payload JSON]``."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents.core.suspensions import task_signal
from agents_project.errors import ApplicationError


class Command(BaseCommand):
    help = (
        "Send the event NAME to a task: it resumes if it waits for it, otherwise the "
        "signal is kept for its next wait of that name."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_id")
        parser.add_argument("name")
        parser.add_argument("--payload", default="null", help="JSON the next step sees")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            payload = json.loads(options["payload"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--payload: not valid JSON: {exc}") from exc
        try:
            signal = task_signal(
                task_id=options["task_id"],
                user=None,
                name=options["name"],
                payload=payload,
                actor="cli",
            )
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        state = "consumed by the waiting task" if signal.consumed_at else "kept until a wait"
        self.stdout.write(f"signal {signal.pk}: {state}")
