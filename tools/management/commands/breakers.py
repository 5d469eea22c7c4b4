"""``python manage.py breakers [--open NAME | --close NAME] [--json]``.

``--open`` also takes a breaker nothing has used yet (planned maintenance of a host:
``http:<host>:<port>`` for ``http.get``). ``--json`` prints one JSON array (``[]`` when
there is no breaker).
"""

from __future__ import annotations

import json
from typing import Any

import redis
from django.core.management.base import BaseCommand, CommandError

from agents_project.errors import ApplicationError
from audit.services import process_actor
from tools.breakers import BreakerStatus
from tools.selectors import breaker_known, breaker_states
from tools.services import breaker_force_close, breaker_force_open


class Command(BaseCommand):
    help = (
        "List every circuit breaker with its state and failure count; --open NAME holds "
        "one open (calls fail fast, steps wait) until --close NAME closes it."
    )

    def add_arguments(self, parser: Any) -> None:
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--open", metavar="NAME", help="hold this breaker open")
        action.add_argument("--close", metavar="NAME", help="close this breaker now")
        parser.add_argument("--json", action="store_true", help="a JSON array of breakers")

    def handle(self, *args: Any, **options: Any) -> None:
        actor = process_actor("cli")
        try:
            if options["open"]:
                if not breaker_known(name=options["open"]):
                    self.stderr.write(
                        f"{options['open']} has not been used yet: held open in advance; the "
                        "first call through a breaker of exactly this name will wait"
                    )
                breaker_force_open(name=options["open"], actor=actor)
            elif options["close"]:
                breaker_force_close(name=options["close"], actor=actor)
            states = breaker_states()
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        except redis.RedisError as exc:
            raise CommandError(f"breaker state is in Redis, which is unreachable: {exc}") from exc
        if options["json"]:
            self.stdout.write(json.dumps([status.as_dict() for status in states]))
            return
        self.stdout.write(f"{'breaker':<40} {'state':<10} {'failures':>8}  opened / trial")
        for status in states:
            self.stdout.write(
                f"{status.name:<40} {status.state:<10} "
                f"{status.failures:>4}/{status.fail_max:<3}  {_when(status)}"
            )
        if not states:
            self.stderr.write("no circuit breaker has been used yet")


def _when(status: BreakerStatus) -> str:
    if status.opened_at is None:
        return ""
    opened = status.opened_at.strftime("%Y-%m-%d %H:%M:%S")
    if status.forced:
        return f"{opened}, held open until closed"
    if status.remaining:
        return f"{opened}, trial call in {status.remaining:.0f} s"
    return f"{opened}, trial call allowed"
