"""System checks for the tools: configuration mistakes found at start-up."""

from __future__ import annotations

from typing import Any

from cryptography.fernet import Fernet
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.db import DatabaseError

from tools.outbound import parse_allow_list


@register()
def breakers_are_shared(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    """Without Redis each process has its own circuit breakers: fine for the demo only."""
    if settings.REDIS_URL or settings.AGENTS["ENVIRONMENT"] != "production":
        return []
    return [
        Warning(
            "REDIS_URL is empty: every process keeps its own circuit breakers, so each "
            "worker process keeps calling a failing dependency until its own breaker opens, "
            "and the breakers command cannot see or force them.",
            hint="Set REDIS_URL.",
            id="tools.W001",
        )
    ]


@register()
def outbound_allow_list_parses(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """Every entry of ``AGENTS_OUTBOUND_ALLOW`` is a host, an address or a CIDR."""
    try:
        parse_allow_list(settings.AGENTS["OUTBOUND_ALLOW"])
    except ValueError as exc:
        return [Error(str(exc), id="tools.E001")]
    return []


@register()
def credentials_keys_are_fernet_keys(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """Every ``AGENTS_CREDENTIALS_KEY`` entry must be a Fernet key: a placeholder would
    pass start-up and only fail at the first ``credentials set`` or tool call."""
    errors = []
    for position, key in enumerate(settings.AGENTS["CREDENTIALS_KEYS"], start=1):
        try:
            Fernet(key.strip())
        except (ValueError, TypeError):
            errors.append(
                Error(
                    f"AGENTS_CREDENTIALS_KEY: key {position} is not a Fernet key "
                    "(32 url-safe base64-encoded bytes)",
                    hint="Generate one with: python -c 'from cryptography.fernet import "
                    "Fernet; print(Fernet.generate_key().decode())'",
                    id="tools.E002",
                )
            )
    return errors


@register(Tags.security, deploy=True)
def credentials_are_bound(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    """Credentials stored before hosts were required, bound to no host: tools refuse to
    send them anywhere until they are set again with ``--host`` (or ``--any-host``)."""
    from tools.models import Credential

    try:
        unbound = list(
            Credential.objects.filter(hosts=[])
            .order_by("owner__username", "name")
            .values_list("owner__username", "name", "task_id")[:50]
        )
    except DatabaseError:  # no database yet (checked before migrate)
        return []
    if not unbound:
        return []
    listed = ", ".join(
        f"{owner}/{name}" + (f" (task {task})" if task else "") for owner, name, task in unbound
    )
    return [
        Warning(
            f"credentials bound to no host, which tools refuse to send: {listed}",
            hint="Set each again: printf %s VALUE | python manage.py credentials set "
            "--owner OWNER --name NAME --host HOST (or --any-host).",
            id="tools.W002",
        )
    ]
