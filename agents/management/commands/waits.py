"""``python manage.py waits [--kind approval|event|timer]``: who is waiting for what."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.utils import timezone

from agents.models import Suspension
from agents.selectors import open_waits


class Command(BaseCommand):
    help = (
        "List suspended tasks, oldest wait first: what each waits for (an approval's "
        "question, an event's name, a timer), since when, and until when."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--kind", choices=Suspension.Kind.values, default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        waits = list(open_waits(kind=options["kind"])[:1000])
        if not waits:
            self.stdout.write("No task is waiting.")
            return
        for wait in waits:
            what = wait.reason or wait.event_name or "a time"
            age = int((now - wait.created_at).total_seconds())
            until = f"  until {wait.wake_at:%Y-%m-%d %H:%M:%S}" if wait.wake_at else ""
            self.stdout.write(
                f"{wait.task_id}  {wait.task.owner.get_username():<12} {wait.kind:<8} "
                f"waiting {age} s{until}  {what}"
            )
