"""``python manage.py mcp_servers add|list|remove|refresh``: the MCP tool servers.

::

    python manage.py mcp_servers add time --command "mcp-server-time"
    python manage.py mcp_servers add tracker --url https://mcp.example.com/mcp \\
        --owner alice --header Authorization=tracker_token
    python manage.py mcp_servers list --json
    python manage.py mcp_servers remove tracker --owner alice

A server without ``--owner`` is the deployment's: every owner's tasks may use its tools
(``mcp:<name>/<tool>``). Header values are the names of the calling task owner's
credentials (``manage.py credentials set``), never secrets on the command line.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from agents_project.errors import ApplicationError
from audit.services import process_actor
from tools.mcp import (
    mcp_server_add,
    mcp_server_as_dict,
    mcp_server_refresh,
    mcp_server_remove,
    mcp_servers_visible,
)
from tools.models import McpServer


class Command(BaseCommand):
    help = "Register, list, refresh and remove MCP tool servers (tools mcp:NAME/TOOL)."

    def add_arguments(self, parser: Any) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        add = actions.add_parser("add", help="register a server and discover its tools")
        add.add_argument("name", help="the server's name in tool names (mcp:NAME/TOOL)")
        transport = add.add_mutually_exclusive_group(required=True)
        transport.add_argument("--command", help='a stdio server: "CMD ARGS" (no shell)')
        transport.add_argument("--url", help="a streamable-HTTP server's URL")
        add.add_argument(
            "--header",
            dest="headers",
            action="append",
            default=[],
            metavar="NAME=CREDENTIAL_NAME",
            help="send the calling owner's credential as this header (HTTP; repeatable)",
        )
        add.add_argument(
            "--approve",
            choices=McpServer.Approve.values,
            default=McpServer.Approve.DESTRUCTIVE,
            help="which tools need a person's approval per call (default: destructive)",
        )
        add.add_argument("--timeout", type=float, default=None, help="seconds per call")
        remove = actions.add_parser("remove", help="remove a server")
        remove.add_argument("name")
        refresh = actions.add_parser("refresh", help="read a server's tool list again")
        refresh.add_argument("name")
        for sub in (add, remove, refresh):
            sub.add_argument("--owner", default=None, help="the user owning it (default: none)")
        listing = actions.add_parser("list", help="every server and its tools")
        listing.add_argument("--json", action="store_true", help="as a JSON array")

    def handle(self, *args: Any, **options: Any) -> None:
        actor = process_actor("cli")
        owner = _user(options["owner"]) if options.get("owner") else None
        try:
            if options["action"] == "add":
                server = mcp_server_add(
                    name=options["name"],
                    command=options["command"],
                    url=options["url"],
                    owner=owner,
                    headers=options["headers"],
                    approve=options["approve"],
                    timeout=options["timeout"],
                    actor=actor,
                )
                tools = ", ".join(mcp_server_as_dict(server)["tools"]) or "(listed at first use)"
                self.stdout.write(f"MCP server {server.name} added: {tools}")
            elif options["action"] == "remove":
                mcp_server_remove(name=options["name"], owner=owner, actor=actor)
                self.stdout.write(f"MCP server {options['name']} removed")
            elif options["action"] == "refresh":
                server = mcp_server_refresh(name=options["name"], owner=owner, actor=actor)
                self.stdout.write(f"MCP server {server.name}: {len(server.tools)} tool(s)")
            else:
                servers = [mcp_server_as_dict(s) for s in mcp_servers_visible(owner=None)]
                if options["json"]:
                    self.stdout.write(json.dumps(servers, indent=2))
                    return
                for s in servers:
                    where = s["command"] or s["url"]
                    self.stdout.write(
                        f"{s['name']:<20} {s['owner'] or '(deployment)':<16} {s['transport']:<6} "
                        f"{where}  approve={s['approve']}  tools: {', '.join(s['tools']) or '-'}"
                    )
        except ApplicationError as exc:
            field = f"{exc.field}: " if exc.field else ""
            raise CommandError(f"{field}{exc.message}") from exc


def _user(username: str) -> User:
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"no user {username!r}")
    return user
