"""``python manage.py credentials set|list|delete|rotate``.

``set`` reads the value from standard input (never from the command line, where it would
stay in shell history and process listings)::

    printf %s "$API_KEY" | python manage.py credentials set --owner alice --name api_key \
        --host api.example.com

``--host`` (repeatable) binds the credential to the hosts it may be sent to; one of it
or ``--any-host`` (the rare exception, logged) is required.
"""

from __future__ import annotations

import getpass
import sys
from typing import IO, Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from agents_project.errors import ApplicationError
from audit.services import process_actor
from tools.credentials import credential_delete, credential_list, credential_set, credentials_rotate


class Command(BaseCommand):
    help = (
        "Manage the credentials tools receive: set (value read from stdin), list (names "
        "only, never values), delete, rotate (re-encrypt under the first key)."
    )
    # Tests pass the value's stream in; on the command line it is stdin.
    stealth_options = ("stdin",)

    def add_arguments(self, parser: Any) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        set_ = actions.add_parser("set", help="store a credential; the value comes from stdin")
        delete = actions.add_parser("delete", help="delete a credential")
        for sub in (set_, delete):
            sub.add_argument("--owner", required=True, help="username owning the credential")
            sub.add_argument("--name", required=True, help="the name tools ask for")
            sub.add_argument("--task", default=None, help="only for this task of the owner")
        set_.add_argument(
            "--host",
            dest="hosts",
            action="append",
            default=[],
            help="a host it may be sent to (repeat for more; *.example.com: subdomains)",
        )
        set_.add_argument(
            "--any-host",
            action="store_true",
            help="the rare exception: send it to any host the outbound policy allows",
        )
        listing = actions.add_parser("list", help="list credentials (names, never values)")
        listing.add_argument("--owner", default=None, help="only this user's")
        actions.add_parser("rotate", help="re-encrypt every credential under the first key")

    def handle(self, *args: Any, **options: Any) -> None:
        actor = process_actor("cli")
        try:
            if options["action"] == "set":
                value = _read_value(options.get("stdin") or sys.stdin)
                credential_set(
                    owner=_user(options["owner"]),
                    name=options["name"],
                    value=value,
                    task_id=options["task"],
                    hosts=options["hosts"],
                    any_host=options["any_host"],
                    actor=actor,
                )
                self.stdout.write(f"credential {options['name']} stored")
            elif options["action"] == "delete":
                credential_delete(
                    owner=_user(options["owner"]),
                    name=options["name"],
                    task_id=options["task"],
                    actor=actor,
                )
                self.stdout.write(f"credential {options['name']} deleted")
            elif options["action"] == "list":
                owner = _user(options["owner"]) if options["owner"] else None
                for credential in credential_list(owner=owner):
                    scope = f"task {credential.task_id}" if credential.task_id else "all tasks"
                    hosts = ",".join(credential.hosts) or "UNBOUND (sent nowhere)"
                    hosts = "any host" if hosts == "*" else hosts
                    self.stdout.write(
                        f"{credential.owner.get_username():<20} {credential.name:<30} "
                        f"{scope:<42} {hosts:<30} "
                        f"updated {credential.updated_at:%Y-%m-%d %H:%M:%S}"
                    )
            else:
                count = credentials_rotate(actor=actor)
                self.stdout.write(f"{count} credential(s) re-encrypted under the first key")
        except ApplicationError as exc:
            field = f"{exc.field}: " if exc.field else ""
            raise CommandError(f"{field}{exc.message}") from exc


def _user(username: str) -> User:
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"no user {username!r}")
    return user


def _read_value(stream: IO[str]) -> str:
    if stream.isatty():
        return getpass.getpass("value (not echoed): ")
    # One trailing newline is the shell's (echo), not part of the secret.
    value = stream.read()
    return value[:-1] if value.endswith("\n") else value
