"""``python manage.py demo``: the zero-setup showcase (see agents/demo.py)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from agents.demo import demo_run
from agents.models import TaskStatus


class Command(BaseCommand):
    help = "Run a multi-step agent on a real worker with an embedded broker; print its timeline."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--llm",
            action="store_true",
            help="Run the built-in llm agent: against AGENTS_LLM_BASE_URL if set, else "
            "against a scripted chat-completions server the demo starts on loopback.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        task = demo_run(out=self.stdout.write, llm=options["llm"])
        if task.status != TaskStatus.COMPLETED:
            raise SystemExit(1)
