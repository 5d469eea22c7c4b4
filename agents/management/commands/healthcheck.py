"""``python manage.py healthcheck [--worker] [--json]``: an exit code for exec probes."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from tools.health import readiness, worker_readiness


class Command(BaseCommand):
    help = (
        "Exit 0 if this deployment can do its work (database, broker, Redis, every tool's "
        "probe, no open circuit breaker); non-zero with the reasons otherwise. --worker "
        "asks the local worker (AGENTS_WORKER_HEALTH_PORT), or checks the broker, the "
        "tools and that a worker answers a ping."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--worker", action="store_true", help="the worker's view")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        report = worker_readiness() if options["worker"] else readiness()
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict()))
        else:
            for check in report.checks:
                mark = "ok  " if check.ok else "FAIL"
                detail = f"  {check.error}" if check.error else ""
                timing = f" ({check.ms:.0f} ms)" if check.ms is not None else ""
                self.stdout.write(f"{mark} {check.name}{timing}{detail}")
        if not report.ok:
            raise CommandError("not ready: " + "; ".join(report.problems()), returncode=1)
