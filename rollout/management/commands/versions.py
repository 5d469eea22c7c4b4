"""``python manage.py versions [AGENT] [--json]``: per agent and version, the tasks in
each status, the live workers serving it and its share of new tasks.
``--rollback AGENT VERSION``: VERSION takes no new tasks (they go to the newest other
version served); its running tasks finish on its workers. ``--restore AGENT VERSION``
undoes it. See ``agents.core.versions``."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand

from agents.core.versions import version_hold, version_release
from audit.services import process_actor
from rollout.selectors import versions_overview


class Command(BaseCommand):
    help = "Agent versions: tasks per status, live workers, intake; roll a version back."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("agent", nargs="?", default=None)
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--rollback", nargs=2, metavar=("AGENT", "VERSION"))
        parser.add_argument("--restore", nargs=2, metavar=("AGENT", "VERSION"))
        parser.add_argument("--reason", default="")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["rollback"]:
            name, version = options["rollback"]
            version_hold(
                agent=name,
                version=version,
                actor=process_actor("operator"),
                reason=options["reason"],
            )
            self.stdout.write(
                f"{name} {version} takes no new tasks; its running tasks finish on it"
            )
        if options["restore"]:
            name, version = options["restore"]
            version_release(agent=name, version=version)
            self.stdout.write(f"{name} {version} takes new tasks again")
        rows = versions_overview(agent=options["agent"])
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=1))
            return
        table = [("agent", "version", "intake", "tasks", "workers")]
        for row in rows:
            tasks = " ".join(f"{s}={n}" for s, n in row["tasks"].items()) or "-"
            workers = len(row["workers"])
            served = f"{workers}" + (
                f" (+{len(row['compatible_workers'])} compatible)"
                if row["compatible_workers"]
                else ""
            )
            active = any(row["tasks"].get(s) for s in ("pending", "running", "suspended"))
            if not workers and not row["compatible_workers"] and active:
                served += "  NO LIVE WORKER: its steps wait"
            intake = "held" if row["held"] else f"{row['intake_percent']:g}%"
            table.append((row["agent"], row["version"], intake, tasks, served))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for line in table:
            self.stdout.write(
                "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
            )
