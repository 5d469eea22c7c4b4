"""Agents as tools: an LLM agent that lists ``agent:<name>`` in its ``tools`` may
delegate to that agent. The model's call starts a child task of that agent with the
call's ``input`` (``agents.core.children``), the parent waits holding no worker, and the
tool's result is the child's result (or ``error: ...`` when it ended otherwise).

The child's model spend is added to the parent's usage when it resumes, so it counts
against the parent's budget (``llm.budget``) like the parent's own calls.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from agents.definition import registered_agents
from agents.errors import PermanentError
from agents.models import AgentTask
from llm.selectors import tasks_usage
from tools.registry import Arg, Tool, ToolContext, find_tool

PREFIX = "agent:"


def _never(ctx: ToolContext, args: dict[str, Any]) -> Any:
    raise PermanentError("an agent tool runs as a child task, never in the tool runner")


def agent_tool(name: str) -> Tool | None:
    """The tool ``agent:<name>`` stands for, when ``name`` is a registered agent."""
    if not name.startswith(PREFIX) or name[len(PREFIX) :] not in registered_agents():
        return None
    agent = name[len(PREFIX) :]
    hint = ' (for "llm": {"prompt": TEXT})' if agent == "llm" else ""
    return Tool(
        name=name,
        func=_never,
        args={"input": Arg(dict)},
        description=(
            f"Delegate to the agent {agent!r}: it runs as a task of its own with this "
            f"input{hint}, and its result comes back as this call's result."
        ),
    )


def tool_find(name: str, *, owner_id: int | None = None) -> Tool | None:
    """A registered tool (an MCP tool as ``owner_id``'s tasks see it), or an agent tool
    (``agent:<name>``); None if neither."""
    return find_tool(name, owner_id=owner_id) or agent_tool(name)


def is_agent_tool(name: str) -> bool:
    return name.startswith(PREFIX)


def agent_of(name: str) -> str:
    """``agent:research`` -> ``research``."""
    return name[len(PREFIX) :]


def descendants_usage(*, task_ids: list[str]) -> dict[str, Any]:
    """The model spend of the children ``task_ids`` and all their descendants, as
    ``llm.selectors.task_usage`` counts it (one query per generation, then one sum)."""
    every = [UUID(task_id) for task_id in task_ids]
    generation = list(every)
    while generation:
        generation = list(
            AgentTask.objects.filter(parent_id__in=generation).values_list("pk", flat=True)
        )
        every += generation
    return tasks_usage(task_ids=every)
