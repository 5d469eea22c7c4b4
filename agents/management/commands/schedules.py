"""``python manage.py schedules list|add|edit|pause|resume|remove``: the schedules of
``agents.schedules`` from a shell (the operator acts as the system: every schedule)."""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from agents.models import Schedule
from agents.schedules import (
    schedule_create,
    schedule_delete,
    schedule_pause,
    schedule_update,
    schedules_pause_all,
    schedules_visible_to,
)
from agents_project.errors import ApplicationError


def _timing(parser: Any, *, required: bool) -> None:
    parser.add_argument("--agent", help="the agent each slot starts a task of")
    parser.add_argument("--input", help="the tasks' input (JSON)")
    when = parser.add_mutually_exclusive_group(required=required)
    when.add_argument("--cron", help='a cron expression, e.g. "0 8 * * *"')
    when.add_argument("--interval", type=int, dest="interval_seconds", help="seconds")
    parser.add_argument("--timezone", help="an IANA time zone (default UTC)")
    parser.add_argument("--overlap", choices=("skip", "queue", "cancel"))
    parser.add_argument("--catch-up", dest="catch_up", choices=("skip", "one", "all"))


def _row(schedule: Schedule) -> dict[str, Any]:
    return {
        "id": str(schedule.pk),
        "agent": schedule.agent_name,
        "input": schedule.input,
        "cron": schedule.cron,
        "interval_seconds": schedule.interval_seconds,
        "timezone": schedule.timezone,
        "overlap": schedule.overlap,
        "catch_up": schedule.catch_up,
        "paused": schedule.paused,
        "next_slot": schedule.next_slot.isoformat() if schedule.next_slot else None,
        "owner": schedule.owner.get_username(),
    }


class Command(BaseCommand):
    help = "List, add, edit, pause, resume and remove schedules."

    def add_arguments(self, parser: Any) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="every schedule")
        listing.add_argument("--json", action="store_true")
        add = sub.add_parser("add", help="a new schedule")
        add.add_argument("agent_name", metavar="AGENT")
        add.add_argument("--owner", required=True, help="the username tasks run as")
        _timing(add, required=True)
        add.add_argument("--paused", action="store_true", help="created paused")
        edit = sub.add_parser("edit", help="change a schedule's fields")
        edit.add_argument("schedule_id")
        _timing(edit, required=False)
        for name, about in (("pause", "stop firing"), ("resume", "fire from the next slot")):
            one = sub.add_parser(name, help=about)
            target = one.add_mutually_exclusive_group(required=True)
            target.add_argument("schedule_id", nargs="?")
            target.add_argument("--all", action="store_true", help="every schedule")
        remove = sub.add_parser("remove", help="delete a schedule (its tasks stay)")
        remove.add_argument("schedule_id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except ApplicationError as exc:
            where = f"{exc.field}: " if exc.field else ""
            raise CommandError(f"{where}{exc.message}") from exc

    def _list(self, options: dict[str, Any]) -> None:
        rows = [_row(schedule) for schedule in schedules_visible_to(None)]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for row in rows:
            when = row["cron"] or f"every {row['interval_seconds']} s"
            state = "paused" if row["paused"] else f"next {row['next_slot']}"
            self.stdout.write(
                f"{row['id']}  {row['agent']}  {when} ({row['timezone']})  owner {row['owner']}"
                f"  overlap {row['overlap']}  catch-up {row['catch_up']}  {state}"
            )

    def _fields(self, options: dict[str, Any]) -> dict[str, Any]:
        fields = {
            k: options[k]
            for k in ("cron", "interval_seconds", "timezone", "overlap", "catch_up")
            if options.get(k) is not None
        }
        if options.get("agent"):
            fields["agent"] = options["agent"]
        if options.get("input") is not None:
            try:
                fields["input"] = json.loads(options["input"])
            except json.JSONDecodeError as exc:
                raise CommandError(f"--input: not valid JSON: {exc}") from exc
        return fields

    def _add(self, options: dict[str, Any]) -> None:
        owner = get_user_model().objects.filter(username=options["owner"]).first()
        if owner is None:
            raise CommandError(f"--owner: no user {options['owner']!r}")
        fields = self._fields(options)
        fields.setdefault("input", {})
        fields["agent"] = options["agent_name"]
        schedule = schedule_create(owner=owner, paused=options["paused"], **fields)
        self.stdout.write(f"{schedule.pk}: next slot {schedule.next_slot}")

    def _edit(self, options: dict[str, Any]) -> None:
        schedule = schedule_update(
            schedule_id=options["schedule_id"], user=None, **self._fields(options)
        )
        self.stdout.write(f"{schedule.pk}: next slot {schedule.next_slot}")

    def _pause(self, options: dict[str, Any], paused: bool = True) -> None:
        if options["all"]:
            changed = schedules_pause_all(paused=paused)
            self.stdout.write(f"{changed} schedule(s) {'paused' if paused else 'resumed'}")
            return
        schedule = schedule_pause(schedule_id=options["schedule_id"], user=None, paused=paused)
        self.stdout.write(f"{schedule.pk}: {'paused' if schedule.paused else 'resumed'}")

    def _resume(self, options: dict[str, Any]) -> None:
        self._pause(options, paused=False)

    def _remove(self, options: dict[str, Any]) -> None:
        schedule_delete(schedule_id=options["schedule_id"], user=None)
        self.stdout.write(f"{options['schedule_id']}: removed")
