"""``python manage.py demo``: the zero-setup showcase (see demo/showcase.py)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from agents.models import TaskStatus
from demo.showcase import demo_run


class Command(BaseCommand):
    help = "Run a multi-step agent on a real worker with an embedded broker; print its timeline."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--llm",
            action="store_true",
            help="Run the built-in llm agent: against AGENTS_LLM_BASE_URL if set, else "
            "against a scripted chat-completions server the demo starts on loopback.",
        )
        parser.add_argument(
            "--supervisor",
            action="store_true",
            help="Run a supervisor that fans out to two child tasks (one calls the MCP time "
            "server, one needs an approval the demo edits) and print their joint timeline.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            task = demo_run(
                out=self.stdout.write, llm=options["llm"], supervisor=options["supervisor"]
            )
        except KeyboardInterrupt:
            self.stdout.write("")
            self.stdout.write(
                "Interrupted. The task stays where it was: run the demo again and it "
                "resumes from its last checkpoint."
            )
            raise SystemExit(130) from None
        if task.status != TaskStatus.COMPLETED:
            raise SystemExit(1)
