"""System checks for the tools: configuration mistakes found at start-up."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Warning, register


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
