"""``python manage.py audit TASK_ID [--json]``: a task's audit trail, in order."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents.selectors import task_get
from agents_project.errors import ApplicationError
from audit.selectors import audit_events
from audit.timeline import as_dict, render


class Command(BaseCommand):
    help = "Print a task's audit trail, in order (text, or JSON lines with --json)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_id")
        parser.add_argument("--json", action="store_true", help="one JSON object per line")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            task = task_get(task_id=options["task_id"], user=None)
        except (ApplicationError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        events = audit_events(task_id=task.pk).iterator(chunk_size=2000)
        if options["json"]:
            for event in events:
                self.stdout.write(json.dumps(as_dict(event), default=str))
            return
        self.stdout.write(f"task {task.pk}  {task.agent_name} {task.agent_version}  {task.status}")
        self.stdout.write(render(events))
