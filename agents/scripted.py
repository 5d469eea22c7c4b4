"""The built-in ``scripted`` agent: follows a script, one entry per step.

It drives every behaviour of the runtime without a model, and it is written with the
same public API as any user's agent. Input: ``{"script": [STEP, ...]}``, each STEP one of

==========================================  =============================================
``{"think": TEXT}``                         a reasoning step
``{"tool": NAME, "args": {...}}``           call a tool; its result reaches the next step
                                            (option ``approve``: a question; a person
                                            then approves, edits, answers or rejects
                                            the call first, ``on_reject`` as below; a
                                            tool that needs approval, such as an MCP
                                            tool marked destructive, is put to a
                                            person without one)
``{"approval": REASON}``                    suspend until a person approves (options:
                                            ``timeout``, ``on_timeout``, ``on_reject``)
``{"wait_event": NAME}``                    suspend until the signal NAME (options:
                                            ``timeout``, ``on_timeout``, ``default``)
``{"wait": SECONDS}``                       suspend on a durable timer (at most a year)
``{"sleep": SECONDS}``                      stay busy in the worker (a long step; at
                                            most a day)
``{"fail": MESSAGE, "times": K}``           raise on the first K attempts of this step
                                            (without ``times``: always; with
                                            ``"permanent": true``: a permanent error)
``{"final": ANSWER}``                       finish with ANSWER as the result
``{"spawn": [{"agent": A, "input": {...}},  start child tasks and wait, holding no
...], "join": "all" | "any" | N}``          worker, until all, any or N complete
                                            (``join`` defaults to ``all``)
==========================================  =============================================

A script that runs out without ``final`` finishes with the last tool result, or with
what the last ``spawn`` yielded: the list of the completed children's results in the
order they were started (for ``"any"``, the first to complete's result alone). A child
that fails fails the script's task once the join can no longer hold
(``agents.definition.StartChildren``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from agents.core.clock import now as db_now
from agents.definition import (
    Agent,
    CallTools,
    ChildSpec,
    Continue,
    Finish,
    Outcome,
    Resumption,
    StartChildren,
    StepContext,
    Suspend,
    ToolCall,
    get_agent,
    register,
)
from agents.errors import PermanentError, RetryableError
from agents_project.errors import InvalidInput
from agents_project.validation import json_value_check
from tools.registry import find_tool

_KINDS = ("think", "tool", "approval", "wait_event", "wait", "sleep", "fail", "final", "spawn")
_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "think": {},
    "tool": {"args": dict, "approve": str, "on_reject": str},
    "approval": {"timeout": (int, float), "on_timeout": str, "on_reject": str},
    "wait_event": {"timeout": (int, float), "on_timeout": str, "default": object},
    "wait": {},
    "sleep": {},
    "fail": {"times": int, "permanent": bool},
    "final": {},
    "spawn": {"join": (str, int)},
}
_VALUE_TYPES: dict[str, type | tuple[type, ...]] = {
    "think": str,
    "tool": str,
    "approval": str,
    "wait_event": str,
    "wait": (int, float),
    "sleep": (int, float),
    "fail": str,
    "final": object,
    "spawn": list,
}
# The range of every number a script gives, in seconds unless said otherwise: a wait or
# a wait's timeout at most a year (a durable timer), a sleep at most a day (it holds a
# worker; the step's time limit, which an agent may set, stops it sooner), a retried
# failure at most 100 attempts.
_YEAR = 366 * 86400.0
_BOUNDS: dict[str, Callable[[], tuple[float, float]]] = {
    "wait": lambda: (0.0, _YEAR),
    "sleep": lambda: (0.0, 86400.0),
}
_OPTION_BOUNDS: dict[str, Callable[[], tuple[float, float]]] = {
    "timeout": lambda: (0.0, _YEAR),
    "times": lambda: (0.0, 100.0),
}
# Children one ``spawn`` starts (``agents.core.children.MAX_CHILDREN``).
MAX_SPAWN = 1000
_CHOICES = {"on_timeout": ("fail", "reject", "continue"), "on_reject": ("fail", "continue")}


@register
class Scripted(Agent):
    name = "scripted"
    version = "1.0"
    state_version = 1

    def validate_input(self, input: Any) -> None:
        if not isinstance(input, dict):
            raise InvalidInput("must be an object with a script", field="input")
        script = input.get("script")
        if not isinstance(script, list) or not script:
            raise InvalidInput("must be a non-empty list of steps", field="input.script")
        for index, entry in enumerate(script):
            _validate_entry(entry, f"input.script[{index}]")

    def initial_state(self, input: Any) -> dict[str, Any]:
        return {"pc": 0, "last": None}

    def step(self, ctx: StepContext) -> Outcome:
        script = ctx.input["script"]
        pc = ctx.state["pc"]
        last = ctx.tool_results[-1].value if ctx.tool_results else ctx.state["last"]
        if ctx.resumed is not None and ctx.resumed.kind == "children":
            last = _joined(ctx.resumed, script[pc - 1].get("join", "all"))
        if pc >= len(script):
            return Finish(result=last, state={"pc": pc, "last": last})
        entry = script[pc]
        kind = next(k for k in _KINDS if k in entry)
        value = entry[kind]
        state = {"pc": pc + 1, "last": last}
        if kind == "think":
            return Continue(state=state, reasoning=value)
        if kind == "tool":
            return _tool_step(ctx, entry, state)
        if kind == "approval":
            return Suspend(
                state=state,
                approval=value,
                timeout=entry.get("timeout"),
                on_timeout=entry.get("on_timeout", "fail"),
                on_reject=entry.get("on_reject", "fail"),
            )
        if kind == "wait_event":
            return Suspend(
                state=state,
                event=value,
                timeout=entry.get("timeout"),
                on_timeout=entry.get("on_timeout", "fail"),
                default=entry.get("default"),
            )
        if kind == "wait":
            return Suspend(state=state, until=db_now() + timedelta(seconds=value))
        if kind == "sleep":
            time.sleep(value)
            return Continue(state=state)
        if kind == "spawn":
            return StartChildren(
                [ChildSpec(child["agent"], child.get("input", {})) for child in value],
                join=entry.get("join", "all"),
                state=state,
            )
        if kind == "fail":
            times = entry.get("times")
            if times is None or ctx.attempt <= times:
                if entry.get("permanent"):
                    raise PermanentError(value)
                raise RetryableError(value)
            return Continue(state=state)
        return Finish(result=value, state=state)


def _tool_step(ctx: StepContext, entry: dict[str, Any], state: dict[str, Any]) -> Outcome:
    """A tool step; with ``approve`` (or a tool that needs approval: an MCP tool marked
    destructive, ``Tool.needs_approval``), first a wait for a person's decision on the call
    (the step after it sees the decision: ``agents.definition.Resumption``). A
    ``respond`` is the call's result, as a tool's would be; a rejection the agent
    handles (``on_reject: continue``) gives ``{"rejected": COMMENT}``."""
    call = ToolCall(entry["tool"], entry.get("args", {}))
    question = entry.get("approve")
    tool = find_tool(call.name, owner_id=ctx.owner_id)
    if question is None and tool is not None and tool.needs_approval:
        args = json.dumps(call.args, sort_keys=True)
        question = f"Run tool {call.name} with arguments {args}?"
    if question is None:
        return CallTools([call], state=state)
    pc = state["pc"] - 1
    resumed = ctx.resumed
    if ctx.state.get("asked") != pc or resumed is None or resumed.kind != "approval":
        return Suspend(
            state={**ctx.state, "asked": pc},
            approval=question,
            tool_call=call,
            on_reject=entry.get("on_reject", "fail"),
        )
    if resumed.decision == "respond":
        return Continue(state={**state, "last": resumed.message})
    if not resumed.approved:
        return Continue(state={**state, "last": {"rejected": resumed.comment}})
    if resumed.decision == "edit" and resumed.args is not None:
        call = ToolCall(call.name, resumed.args)
    return CallTools([call], state=state)


def _validate_entry(entry: Any, path: str) -> None:
    if not isinstance(entry, dict):
        raise InvalidInput("must be an object", field=path)
    kinds = [k for k in _KINDS if k in entry]
    if len(kinds) != 1:
        raise InvalidInput(f"needs exactly one of {', '.join(_KINDS)}", field=path)
    kind = kinds[0]
    if not _is(entry[kind], _VALUE_TYPES[kind]):
        raise InvalidInput(f"has the wrong type for {kind}", field=f"{path}.{kind}")
    if kind in _BOUNDS:
        _bounded(entry[kind], _BOUNDS[kind](), f"{path}.{kind}")
    for key, value in entry.items():
        if key == kind:
            continue
        expected = _OPTIONS[kind].get(key)
        if expected is None:
            raise InvalidInput(f"is not an option of {kind}", field=f"{path}.{key}")
        if not _is(value, expected):
            raise InvalidInput("has the wrong type", field=f"{path}.{key}")
        if key in _OPTION_BOUNDS:
            _bounded(value, _OPTION_BOUNDS[key](), f"{path}.{key}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise InvalidInput(f"must be one of {', '.join(_CHOICES[key])}", field=f"{path}.{key}")
    if kind == "tool" and find_tool(entry["tool"]) is None:
        raise InvalidInput(f"unknown tool {entry['tool']!r}", field=f"{path}.tool")
    if kind == "spawn":
        _validate_spawn(entry, path)


def _validate_spawn(entry: dict[str, Any], path: str) -> None:
    children = entry["spawn"]
    if not 1 <= len(children) <= MAX_SPAWN:
        raise InvalidInput(f"must be a list of 1 to {MAX_SPAWN} children", field=f"{path}.spawn")
    join = entry.get("join", "all")
    if join not in ("all", "any") and (
        not isinstance(join, int) or isinstance(join, bool) or not 1 <= join <= len(children)
    ):
        raise InvalidInput(
            f'must be "all", "any" or a number from 1 to {len(children)}', field=f"{path}.join"
        )
    for index, child in enumerate(children):
        field = f"{path}.spawn[{index}]"
        if not isinstance(child, dict) or not isinstance(child.get("agent"), str):
            raise InvalidInput("must be an object with an agent", field=field)
        extra = sorted(set(child) - {"agent", "input"})
        if extra:
            raise InvalidInput("is not an option of a child", field=f"{field}.{extra[0]}")
        try:
            definition = get_agent(child["agent"])
            json_value_check(child.get("input", {}), field="input")
            definition.validate_input(child.get("input", {}))
        except InvalidInput as exc:
            suffix = (exc.field or "").removeprefix("input")
            name = "agent" if exc.field == "agent" else f"input{suffix}"
            raise InvalidInput(exc.message, field=f"{field}.{name}") from None


def _joined(resumed: Resumption, join: Any) -> Any:
    """What a ``spawn`` step yields once its join held (see the module's docstring)."""
    if join == "any":
        first = min(
            (c for c in resumed.payload if c["status"] == "completed"), key=lambda c: c["ended"]
        )
        return first["result"]
    return resumed.results


def _bounded(value: float, bounds: tuple[float, float], field: str) -> None:
    low, high = bounds
    # Compared as given (no float conversion): 10**400 is simply too large.
    if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
        raise InvalidInput(f"must be a number from {low:g} to {high:g}", field=field)


def _is(value: Any, expected: type | tuple[type, ...]) -> bool:
    if expected is object:
        return True
    if isinstance(value, bool):
        return expected is bool
    return isinstance(value, expected)
