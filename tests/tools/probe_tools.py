"""A tool whose availability probe asks the flaky service (``FLAKY_URL``) for its health.

Imported by worker processes of the health tests through ``AGENTS_MODULES``.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from tools.registry import ToolContext, tool


def flaky_probe() -> None:
    httpx.get(f"{os.environ['FLAKY_URL']}/health", timeout=2.0).raise_for_status()


@tool("flaky.status", args={}, timeout=5.0, probe=flaky_probe)
def flaky_status(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """The flaky service's health, as a tool."""
    response = httpx.get(f"{os.environ['FLAKY_URL']}/health", timeout=ctx.timeout)
    return {"status": response.status_code}
