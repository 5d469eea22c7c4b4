"""``python manage.py operator_group [--name NAME]``: the group of console operators."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents.permissions import OPERATOR_GROUP, OPERATOR_PERMISSIONS, operator_group_ensure


class Command(BaseCommand):
    help = (
        "Create (or complete) the group whose members may read and operate every tenant's "
        "tasks, dead letters and circuit breakers. Safe to run any number of times; run it "
        "after migrate. Add users with the admin or `user.groups.add(group)`."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--name", default=OPERATOR_GROUP, help="the group's name")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            group = operator_group_ensure(name=options["name"])
        except LookupError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"group {group.name!r}: {', '.join(OPERATOR_PERMISSIONS)}")
