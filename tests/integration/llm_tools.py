"""Tools only the LLM integration tests need, loaded into their workers with
``AGENTS_MODULES=tests.integration.llm_tools``."""

from __future__ import annotations

import os
import time
from typing import Any

from tools.registry import Arg, ToolContext, tool


@tool("test.slow_once", args={"marker": Arg(str)}, timeout=120.0, side_effects=True)
def slow_once(ctx: ToolContext, args: dict[str, Any]) -> str:
    """The first call creates ``marker`` and then runs for a minute (long enough to kill
    its worker); every later call returns at once."""
    try:
        os.close(os.open(args["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return f"done ({ctx.idempotency_key})"
    time.sleep(60)
    return "finished the slow way"
