"""System checks: configuration mistakes found at start-up, not in an incident."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from agents.definition import registered_agents
from agents.dispatch import step_time_limits


@register()
def stuck_sweep_outlasts_steps(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """The stuck-task sweep must not republish a step that may still be running."""
    stuck_after = settings.AGENTS["STUCK_AFTER"]
    errors = []
    for agent in registered_agents().values():
        _, hard = step_time_limits(agent)
        if hard >= stuck_after:
            errors.append(
                Error(
                    f"agent {agent.name!r}: step time limit {hard:g} s is not below "
                    f"AGENTS_STUCK_AFTER ({stuck_after:g} s)",
                    hint="Raise AGENTS_STUCK_AFTER or lower the agent's step_time_limit.",
                    id="agents.E001",
                )
            )
    return errors
