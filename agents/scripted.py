"""The built-in ``scripted`` agent: follows a script, one entry per step.

It drives every behaviour of the runtime without a model, and it is written with the
same public API as any user's agent. Input: ``{"script": [STEP, ...]}``, each STEP one of

==========================================  =============================================
``{"think": TEXT}``                         a reasoning step
``{"tool": NAME, "args": {...}}``           call a tool; its result reaches the next step
                                            (a tool that needs approval, such as an MCP
                                            tool marked destructive, is first put to a
                                            person: a rejection fails the task)
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
==========================================  =============================================

A script that runs out without ``final`` finishes with the last tool result.
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
    Continue,
    Finish,
    Outcome,
    StepContext,
    Suspend,
    ToolCall,
    register,
)
from agents.errors import PermanentError, RetryableError
from agents_project.errors import InvalidInput
from tools.registry import find_tool

_KINDS = ("think", "tool", "approval", "wait_event", "wait", "sleep", "fail", "final")
_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "think": {},
    "tool": {"args": dict},
    "approval": {"timeout": (int, float), "on_timeout": str, "on_reject": str},
    "wait_event": {"timeout": (int, float), "on_timeout": str, "default": object},
    "wait": {},
    "sleep": {},
    "fail": {"times": int, "permanent": bool},
    "final": {},
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
        if pc >= len(script):
            return Finish(result=last, state={"pc": pc, "last": last})
        entry = script[pc]
        kind = next(k for k in _KINDS if k in entry)
        value = entry[kind]
        state = {"pc": pc + 1, "last": last}
        if kind == "think":
            return Continue(state=state, reasoning=value)
        if kind == "tool":
            return self._tool(ctx, value, entry.get("args", {}), state, last)
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
        if kind == "fail":
            times = entry.get("times")
            if times is None or ctx.attempt <= times:
                if entry.get("permanent"):
                    raise PermanentError(value)
                raise RetryableError(value)
            return Continue(state=state)
        return Finish(result=value, state=state)

    def _tool(
        self, ctx: StepContext, name: str, args: dict[str, Any], state: dict[str, Any], last: Any
    ) -> Outcome:
        """Call the tool, after a person's approval if it needs one (the approval is a
        step of its own; the call follows in the next)."""
        pc = state["pc"] - 1
        tool = find_tool(name, owner_id=ctx.owner_id)
        approved = ctx.state.get("approved") == pc and ctx.resumed is not None
        if tool is not None and tool.needs_approval and not approved:
            return Suspend(
                state={"pc": pc, "last": last, "approved": pc},
                approval=f"Run tool {name} with arguments {json.dumps(args, sort_keys=True)}?",
                reasoning=f"tool {name} needs a person's approval",
            )
        return CallTools([ToolCall(name, args)], state=state)


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
