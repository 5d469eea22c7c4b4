"""LLM agents: a model, tools, a conversation, budgets, and the runtime's guarantees.

:class:`LLMAgent` is the base class of an agent whose steps talk to a model (each step
is an ``llm.step.LLMStep``, which says what a step does and what it guarantees); the
built-in agent ``llm`` is a subclass that takes everything from its input.

Writing your own::

    from llm.agent import LLMAgent, Reply
    from agents.definition import register

    @register
    class Refunds(LLMAgent):
        name = "refunds"
        system_prompt = "You handle refunds. Use calc for arithmetic."
        tools = ("calc", "ledger.append")
        approve_tools = ("ledger.append",)
        model = "small"                       # a name in AGENTS_LLM_MODELS, or None
        context = {"policy": "rolling", "max_messages": 30}
        budget = {"tokens": 50_000, "model_calls": 20}
        on_budget = "approval"

        def prompt(self, input):              # the first user message
            return f"Customer {input['customer']} asks: {input['question']}"

        def final_answer(self, ctx, content):
            if "refund" not in content.lower():
                return Reply("Say whether a refund was made.")
            return {"answer": content}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from django.conf import settings

from agents.definition import Agent, Outcome, StepContext, register, registered_agents
from agents.errors import PermanentError
from agents_project.errors import InvalidInput
from llm.budget import Budget, usage_empty
from llm.client import model_config
from llm.context import POLICIES, ChatMessage, ContextSettings
from llm.delegation import tool_find
from llm.step import LLMStep, Reply, RunSettings, wire_name
from tools.registry import registered_tools

__all__ = ["LLM", "LLMAgent", "Reply", "RunSettings", "gateway_continues", "llm_input_check"]

ON_BUDGET = ("fail", "approval")
CONTEXT_KEYS = {"policy", "max_messages", "max_tokens", "keep_last", "pin_tools"}


def gateway_continues(agent_name: str, tool_calls: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the model gateway may run the step that takes a reply of ``agent_name``
    whose tool calls (the chat-completions wire shape, ``{"function": {"name"}}``) are
    ``tool_calls``, instead of sending it back to a worker: the agent is an
    ``LLMAgent`` that allows it (``continues_on_gateway``), and every call names a
    built-in ``local`` tool (``tools.registry.tool``), whose run no time limit needs to
    guard. Anything else (another tool, an MCP or sub-agent tool) goes to a worker."""
    agent = registered_agents().get(agent_name)
    if not isinstance(agent, LLMAgent) or not agent.continues_on_gateway:
        return False
    local = _local_wire_names()
    return all(
        isinstance(c, Mapping) and (c.get("function") or {}).get("name") in local
        for c in tool_calls
    )


def _local_wire_names() -> frozenset[str]:
    return frozenset(wire_name(t.name) for t in registered_tools().values() if t.local)


class LLMAgent(Agent):
    """Base class of LLM agents. Set the class attributes; override hooks as needed.

    Class attributes: ``system_prompt``, ``tools`` and ``approve_tools`` (tool names in
    the registry), ``model`` (a model name; None: ``AGENTS_LLM_MODEL``), ``context``
    (``{"policy", "max_messages", "max_tokens", "keep_last"}``, see ``llm.context``),
    ``budget`` (``{"tokens", "cost", "model_calls"}``), ``on_budget`` (``fail`` or
    ``approval``), ``max_steps`` (model turns before the task fails with
    ``max_steps_exceeded``).

    Hooks: ``prompt(input)`` (the first user message), ``run_settings(input)`` (all of
    the above for one task), ``mark(ctx, message)`` (pin a message or start a sub-task
    as it is added), ``shape_messages(ctx, messages)`` (the request's messages, last
    chance to change them), ``final_answer(ctx, content)`` (the task's result, or a
    :class:`Reply` to keep going).
    """

    system_prompt: ClassVar[str] = ""
    tools: ClassVar[Sequence[str]] = ()
    approve_tools: ClassVar[Sequence[str]] = ()
    model: ClassVar[str | None] = None
    context: ClassVar[Mapping[str, Any]] = {"policy": "full"}
    budget: ClassVar[Mapping[str, Any]] = {}
    on_budget: ClassVar[str] = "fail"
    max_steps: ClassVar[int] = 20
    # A tool's permanent error goes back to the model as that call's result.
    tool_errors_to_agent: ClassVar[bool] = True
    # With the model gateway, a delivery goes on after the tools of a recorded reply up
    # to the next model call, which it hands off: one delivery per model call, not two.
    continue_after_tools: ClassVar[bool] = True
    # The model gateway may run the step that takes this agent's reply itself, on its
    # own threads, when the reply calls no tool or only local ones (``gateway_continues``).
    # False for an agent whose hooks (``final_answer``, ``mark``...) wait on anything.
    continues_on_gateway: ClassVar[bool] = True

    @property
    def steps_per_delivery(self) -> int:  # type: ignore[override]
        """8 with the model gateway (``AGENTS_LLM_GATEWAY``; a hand-off ends the
        delivery anyway), else 1: a model call in the worker is a step of its own."""
        return 8 if settings.LLM["GATEWAY"] else 1

    @property
    def commit_every(self) -> int:  # type: ignore[override]
        """As ``steps_per_delivery``: with the gateway, the step that took a reply is
        committed with the next request's hand-off, in one transaction."""
        return self.steps_per_delivery

    # --- hooks ----------------------------------------------------------------------------

    def prompt(self, input: Any) -> str:
        """The conversation's first user message."""
        return str(input["prompt"])

    def run_settings(self, input: Any) -> RunSettings:
        return RunSettings(
            system=self.system_prompt,
            prompt=self.prompt(input),
            model=self.model,
            tools=tuple(self.tools),
            approve_tools=tuple(self.approve_tools),
            max_steps=self.max_steps,
            budget=Budget.from_input(dict(self.budget)),
            on_budget=self.on_budget,
            context=ContextSettings.from_input(dict(self.context)),
        )

    def mark(self, ctx: StepContext, message: ChatMessage) -> bool:
        """Called for each message as it is added. Set ``message.pinned`` to keep it in
        every request under the ``select`` policy; return True to start a new sub-task
        with this message (``select`` keeps only the current sub-task's turns)."""
        return False

    def shape_messages(self, ctx: StepContext, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The messages of the next request, after the context policy. With the model
        gateway it runs once per request, before the hand-off (not again when the reply
        comes back), so it should not change ``ctx.state``."""
        return messages

    def final_answer(self, ctx: StepContext, content: str) -> Any:
        """The task's result for a reply without tool calls, or a :class:`Reply`."""
        return {"answer": content}

    # --- the runtime's side -----------------------------------------------------------------

    def validate_input(self, input: Any) -> None:
        if not isinstance(input, dict):
            raise InvalidInput("must be an object", field="input")
        try:
            settings = self.run_settings(input)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"is not usable: {exc}", field="input") from None
        try:
            model_config(settings.model, need_price=settings.budget.cost is not None)
        except PermanentError as exc:
            raise InvalidInput(str(exc), field="model") from None

    def initial_state(self, input: Any) -> dict[str, Any]:
        return {
            "messages": 0,  # messages stored (seq 0 .. messages - 1)
            "head": 0,  # how many of them are the system prompt and the prompt
            "subtask": 0,
            "turns": 0,  # model replies so far
            "usage": usage_empty(),
            "summary": None,  # {"call": ModelCall id, "upto": first seq not in it}
            "pending": None,  # the last reply's tool calls, until their results are in
            "awaiting": None,  # what a suspension waits for: tool | budget | owner_budget
            "budget_grants": 0,  # approvals past the task's budget
            "budget_offer": None,  # what the approval being asked for grants
            "budget_limit": None,  # the budget plus the grants approved (None: none yet)
            "owner_grant_day": None,
            "context_limits": None,  # limits shrunk after a "context too long"
        }

    def step(self, ctx: StepContext) -> Outcome:
        return LLMStep(self, ctx).run()


# --- the built-in agent -------------------------------------------------------------------------

_INPUT_KEYS = {
    "prompt",
    "system",
    "model",
    "tools",
    "approve_tools",
    "max_steps",
    "budget",
    "on_budget",
    "context",
    "stream",
}


@register
class LLM(LLMAgent):
    """The built-in ``llm`` agent: everything comes from its input::

        {"prompt": "text", "system": "text?", "model": "name?",
         "tools": ["calc", "ledger.append", "agent:NAME"],
         "approve_tools": ["ledger.append"],
         "max_steps": 20, "budget": {"tokens": 20000, "cost": 0.5, "model_calls": 10},
         "on_budget": "fail | approval",
         "context": {"policy": "full | rolling | summarize | select",
                     "max_messages": 20, "max_tokens": 6000, "keep_last": 6,
                     "pin_tools": ["name"]}}

    ``context.pin_tools`` (optional): results of these tools are pinned (``select``).
    """

    name = "llm"
    version = "1.0"

    def run_settings(self, input: Any) -> RunSettings:
        return RunSettings(
            system=input.get("system") or "",
            prompt=input["prompt"],
            model=input.get("model"),
            tools=tuple(input.get("tools") or ()),
            approve_tools=tuple(input.get("approve_tools") or ()),
            max_steps=input.get("max_steps", 20),
            budget=Budget.from_input(input.get("budget")),
            on_budget=input.get("on_budget", "fail"),
            context=ContextSettings.from_input(input.get("context")),
            stream=bool(input.get("stream", False)),
        )

    def mark(self, ctx: StepContext, message: ChatMessage) -> bool:
        pin = (ctx.input.get("context") or {}).get("pin_tools") or ()
        if message.role == "tool" and message.name in pin:
            message.pinned = True
        return False

    def validate_input(self, input: Any) -> None:
        llm_input_check(input)


def llm_input_check(input: Any) -> None:
    """Refuse an ``llm`` input that can never run, naming the field (``InvalidInput``)."""
    if not isinstance(input, dict):
        raise InvalidInput("must be an object with a prompt", field="input")
    unknown = sorted(set(input) - _INPUT_KEYS)
    if unknown:
        raise InvalidInput("is not an option of the llm agent", field=f"input.{unknown[0]}")
    _check(input, "prompt", str, required=True)
    if not input["prompt"].strip():
        raise InvalidInput("must not be empty", field="input.prompt")
    _check(input, "system", str)
    _check(input, "stream", bool)
    model = _check(input, "model", str)
    if model is not None and not model:
        raise InvalidInput("must be a model name", field="input.model")
    for key in ("tools", "approve_tools"):
        names = _check(input, key, list) or []
        for index, name in enumerate(names):
            if not isinstance(name, str) or tool_find(name) is None:
                raise InvalidInput(f"unknown tool {name!r}", field=f"input.{key}[{index}]")
    for index, name in enumerate(input.get("approve_tools") or ()):
        if name not in (input.get("tools") or ()):
            raise InvalidInput("must also be in tools", field=f"input.approve_tools[{index}]")
    max_steps = _check(input, "max_steps", int)
    if max_steps is not None and max_steps < 1:
        raise InvalidInput("must be at least 1", field="input.max_steps")
    budget = _check(input, "budget", dict) or {}
    for key, expected in (("tokens", int), ("cost", (int, float)), ("model_calls", int)):
        value = _check(budget, key, expected, path="input.budget")
        if value is not None and value <= 0:
            raise InvalidInput("must be above 0", field=f"input.budget.{key}")
    extra = sorted(set(budget) - {"tokens", "cost", "model_calls"})
    if extra:
        raise InvalidInput("is not a budget", field=f"input.budget.{extra[0]}")
    on_budget = _check(input, "on_budget", str)
    if on_budget is not None and on_budget not in ON_BUDGET:
        raise InvalidInput(f"must be one of {', '.join(ON_BUDGET)}", field="input.on_budget")
    context = _check(input, "context", dict) or {}
    extra = sorted(
        set(context) - {"policy", "max_messages", "max_tokens", "keep_last", "pin_tools"}
    )
    if extra:
        raise InvalidInput("is not a context option", field=f"input.context.{extra[0]}")
    policy = _check(context, "policy", str, path="input.context")
    if policy is not None and policy not in POLICIES:
        raise InvalidInput(f"must be one of {', '.join(POLICIES)}", field="input.context.policy")
    for key in ("max_messages", "max_tokens", "keep_last"):
        value = _check(context, key, int, path="input.context")
        if value is not None and value < 1:
            raise InvalidInput("must be at least 1", field=f"input.context.{key}")
    _check(context, "pin_tools", list, path="input.context")
    try:
        # On the allow-list, matched exactly; priced if a cost budget applies.
        model_config(model, need_price=budget.get("cost") is not None)
    except PermanentError as exc:
        raise InvalidInput(str(exc), field="input.model") from None


def _check(
    data: dict[str, Any],
    key: str,
    expected: type | tuple[type, ...],
    *,
    required: bool = False,
    path: str = "input",
) -> Any:
    if key not in data or data[key] is None:
        if required:
            raise InvalidInput("is required", field=f"{path}.{key}")
        return None
    value = data[key]
    if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
        names = expected if isinstance(expected, tuple) else (expected,)
        kinds = {
            bool: "true or false",
            str: "a string",
            int: "an integer",
            float: "a number",
            list: "a list",
            dict: "an object",
        }
        raise InvalidInput(f"must be {' or '.join(kinds[t] for t in names)}", field=f"{path}.{key}")
    return value
