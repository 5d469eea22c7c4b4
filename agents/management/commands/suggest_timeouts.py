"""``python manage.py suggest_timeouts [--agent NAME ...] [--apply]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from agents.timeouts import HEADROOM, duration_report, learned_limits_apply


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Command(BaseCommand):
    help = (
        "Print p50/p95/p99 of past step and task durations per agent and step kind, with "
        "a recommended limit; --apply stores them for agents with learned_limits = True."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--agent", action="append", help="only this agent (repeatable)")
        parser.add_argument("--apply", action="store_true", help="store the recommendations")

    def handle(self, *args: Any, **options: Any) -> None:
        rows = duration_report(agents=options["agent"])
        if not rows:
            self.stdout.write("No finished steps yet: nothing to learn from.")
            return
        header = f"{'agent':<20} {'kind':<14} {'samples':>8} {'p50':>10} {'p95':>10} {'p99':>10}"
        self.stdout.write(f"{header} {'recommended':>12}")
        for r in rows:
            self.stdout.write(
                f"{r.agent:<20} {r.kind:<14} {r.samples:>8} {_fmt(r.p50):>10} {_fmt(r.p95):>10} "
                f"{_fmt(r.p99):>10} {_fmt(r.recommended):>12}"
            )
        self.stdout.write(f"(recommended = p99 x {HEADROOM:g}, rounded up, at least 1 s)")
        if options["apply"]:
            stored, refused = learned_limits_apply(rows=rows)
            for limit in stored:
                timeout = f"{limit.task_timeout:g} s" if limit.task_timeout else "none"
                self.stdout.write(
                    f"stored {limit.agent_name}: step limit {limit.step_time_limit:g} s, "
                    f"task deadline {timeout}"
                )
            for skip in refused:
                self.stdout.write(
                    f"not stored {skip.agent}: {skip.samples} finished steps, at least "
                    f"{skip.needed} needed (AGENTS_LEARN_MIN_SAMPLES)"
                )
