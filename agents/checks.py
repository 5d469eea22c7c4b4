"""System checks: configuration mistakes found at start-up, not in an incident."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register


@register()
def lease_outlives_heartbeats(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """A lease must survive a few missed heartbeats (each a sixth of it), or a healthy
    step that stalls for a moment would be taken over by a second copy."""
    ttl = settings.AGENTS["LEASE_TTL"]
    if ttl < 2:
        return [
            Error(
                f"AGENTS_LEASE_TTL is {ttl:g} s; a lease needs at least 2 s",
                hint="Use the default (6 s) unless you measured why not.",
                id="agents.E001",
            )
        ]
    return []
