"""``python manage.py evaluate CASES.jsonl --agent NAME [--version V] [--baseline FILE]
[--save-baseline FILE] [--report FILE] [--recording FILE] [--override JSON]
[--replay | --live]``: run the cases through the engine in this process, print the
table, write the report. Exit status 1 on any regression against ``--baseline``
(without one: on any failed case, unless ``--save-baseline`` records the current state,
known failures included), 2 on bad input. See ``evals.services``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents_project.errors import InvalidInput
from evals.recording import Recording
from evals.services import cases_load, evaluation_run, report_compare, report_table


class Command(BaseCommand):
    help = "Evaluate an agent on a case file, against a baseline; non-zero exit on regression."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("cases", type=Path)
        parser.add_argument("--agent", required=True)
        # ``--version`` is the agent's version here, not Django's: let it replace the
        # base command's option (argparse's "resolve" conflict handling).
        parser.conflict_handler = "resolve"
        parser._optionals.conflict_handler = "resolve"
        parser.add_argument("--version", dest="agent_version", default=None)
        parser.add_argument("--baseline", type=Path, default=None)
        parser.add_argument("--save-baseline", type=Path, default=None)
        parser.add_argument("--report", type=Path, default=None)
        parser.add_argument(
            "--recording",
            type=Path,
            default=None,
            help="model replies (default: CASES with the suffix .recording.json)",
        )
        parser.add_argument(
            "--override", default=None, help="JSON object merged into every case's input"
        )
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--replay", action="store_true", help="replies from the recording")
        mode.add_argument("--live", action="store_true", help="ask the model, and record")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            cases = cases_load(path=options["cases"])
            override = json.loads(options["override"]) if options["override"] else None
            baseline = json.loads(options["baseline"].read_text()) if options["baseline"] else None
            path = options["recording"] or options["cases"].with_suffix(".recording.json")
            recording = Recording(path, live=options["live"])
            report = evaluation_run(
                cases=cases,
                agent=options["agent"],
                version=options["agent_version"],
                recording=recording,
                override=override,
                case_timeout=options["timeout"],
            )
        except InvalidInput as exc:
            raise CommandError(f"{exc.field}: {exc}", returncode=2) from None
        except (OSError, ValueError) as exc:
            raise CommandError(str(exc), returncode=2) from None
        failed = report["summary"]["failed"] > 0 and options["save_baseline"] is None
        if baseline is not None:
            failed = bool(report_compare(report=report, baseline=baseline)["regressions"])
        text = json.dumps(report, indent=1, sort_keys=True) + "\n"
        for target in (options["report"], options["save_baseline"]):
            if target is not None:
                target.write_text(text)
        self.stdout.write(report_table(report))
        if failed:
            sys.exit(1)
