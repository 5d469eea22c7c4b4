"""``python manage.py run_agent AGENT --input JSON [--wait] [--timeout SECONDS]``."""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents.core.state_machine import FINAL
from agents.models import AgentTask, TaskStatus
from agents.services import service_user, task_start
from agents_project.errors import ApplicationError

# What --wait waits for: the task ended, or stopped where only an operator can move it.
_DONE = FINAL | {TaskStatus.DEAD_LETTERED}


class Command(BaseCommand):
    help = "Start an agent task and print its id; with --wait, wait for it to end."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("agent")
        parser.add_argument("--input", required=True, help="the task's input, as JSON")
        parser.add_argument("--wait", action="store_true", help="wait until the task ends")
        parser.add_argument(
            "--timeout", type=float, default=None, help="the task's deadline, in seconds"
        )
        parser.add_argument("--owner", default="cli", help="username owning the task")
        parser.add_argument("--idempotency-key", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            data = json.loads(options["input"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--input: not valid JSON: {exc}") from exc
        try:
            task, created = task_start(
                owner=service_user(options["owner"]),
                agent=options["agent"],
                input=data,
                idempotency_key=options["idempotency_key"],
                timeout_seconds=options["timeout"],
            )
        except ApplicationError as exc:
            field = f"{exc.field}: " if exc.field else ""
            raise CommandError(f"{field}{exc.message}") from exc
        self.stdout.write(str(task.pk))
        if not created:
            self.stderr.write("(an existing task with this idempotency key)")
        if not options["wait"]:
            return
        status = None
        while task.status not in _DONE:
            if task.status != status:
                status = task.status
                self.stderr.write(f"{status} at step {task.current_step}")
            time.sleep(0.1)
            task = AgentTask.objects.get(pk=task.pk)
        self.stdout.write(f"status: {task.status}")
        if task.status == TaskStatus.COMPLETED:
            self.stdout.write(f"result: {json.dumps(task.result)}")
        else:
            self.stdout.write(f"error: {task.error}")
            raise SystemExit(1)
