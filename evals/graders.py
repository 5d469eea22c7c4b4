"""Graders: each checks one expectation of a case against what the run produced.

A case's ``expect`` maps a grader name to its argument::

    answer_equals    "text"               the answer, exactly
    answer_contains  "text" | ["a", "b"]  every text appears in the answer
    answer_matches   "regex"              ``re.search`` finds it in the answer
    result_schema    {JSON Schema}        the task's result validates (``jsonschema``)
    tools_called     ["calc", ...]        these tools, in this order (every call);
                     {"set": [...]}       or these tools, in any order, each at least once
    max_tokens       1000                 tokens of every model call, together
    max_cost         0.01                 their cost (the currency of the model's price)
    max_steps        5                    steps the task ran
    status           "completed"          the task's final status (default: completed)
    python           "pkg.module.func"    ``func(run: Run, arg)`` -> bool, a score in
                                          [0, 1], or ``(bool | score, detail)``; with
                     {"path": "...", "arg": ...}  an argument

The answer is the result's ``answer`` when the result is an object that has one, the
result itself when it is a string, else the result as JSON. Each grader gives a score
in [0, 1] (1 or 0 except ``python``) and passes at 1; a case passes when all pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import jsonschema
from django.utils.module_loading import import_string

from agents_project.errors import InvalidInput


@dataclass
class Run:
    """What one case's run produced, as the graders see it."""

    status: str
    result: Any
    error: str
    steps: int
    tokens: int
    cost: Decimal
    tools: list[str] = field(default_factory=list)
    task_id: str = ""

    @property
    def answer(self) -> str:
        result = self.result
        if isinstance(result, dict) and "answer" in result:
            result = result["answer"]
        if isinstance(result, str):
            return result
        return "" if result is None else json.dumps(result, sort_keys=True)


@dataclass(frozen=True)
class Grade:
    grader: str
    passed: bool
    score: float
    detail: str = ""


def _grade(name: str, passed: bool, detail: str) -> Grade:
    return Grade(name, passed, 1.0 if passed else 0.0, "" if passed else detail)


def answer_equals(run: Run, expected: Any) -> Grade:
    return _grade("answer_equals", run.answer == str(expected), f"answer was {run.answer!r}")


def answer_contains(run: Run, expected: Any) -> Grade:
    wanted = [expected] if isinstance(expected, str) else list(expected)
    missing = [w for w in wanted if str(w) not in run.answer]
    return _grade("answer_contains", not missing, f"missing {missing!r} in {run.answer!r}")


def answer_matches(run: Run, pattern: Any) -> Grade:
    found = re.search(str(pattern), run.answer) is not None
    return _grade("answer_matches", found, f"no match for {pattern!r} in {run.answer!r}")


def result_schema(run: Run, schema: Any) -> Grade:
    try:
        jsonschema.validate(run.result, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return _grade("result_schema", False, f"at {where}: {exc.message}")
    return _grade("result_schema", True, "")


def tools_called(run: Run, expected: Any) -> Grade:
    if isinstance(expected, dict):
        missing = sorted(set(expected["set"]) - set(run.tools))
        return _grade("tools_called", not missing, f"not called: {missing}; called {run.tools}")
    return _grade("tools_called", run.tools == list(expected), f"called {run.tools}")


def max_tokens(run: Run, limit: Any) -> Grade:
    return _grade("max_tokens", run.tokens <= limit, f"{run.tokens} tokens > {limit}")


def max_cost(run: Run, limit: Any) -> Grade:
    ok = run.cost <= Decimal(str(limit))
    return _grade("max_cost", ok, f"cost {run.cost} > {limit}")


def max_steps(run: Run, limit: Any) -> Grade:
    return _grade("max_steps", run.steps <= limit, f"{run.steps} steps > {limit}")


def status(run: Run, expected: Any) -> Grade:
    detail = f"status {run.status}" + (f": {run.error}" if run.error else "")
    return _grade("status", run.status == expected, detail)


def python(run: Run, spec: Any) -> Grade:
    path, arg = (spec["path"], spec.get("arg")) if isinstance(spec, dict) else (spec, None)
    func = import_string(path)
    value = func(run, arg)
    detail = ""
    if isinstance(value, tuple):
        value, detail = value
    score = float(value)
    return Grade("python", score >= 1.0, max(0.0, min(score, 1.0)), "" if score >= 1 else detail)


GRADERS: dict[str, Callable[[Run, Any], Grade]] = {
    "answer_equals": answer_equals,
    "answer_contains": answer_contains,
    "answer_matches": answer_matches,
    "result_schema": result_schema,
    "tools_called": tools_called,
    "max_tokens": max_tokens,
    "max_cost": max_cost,
    "max_steps": max_steps,
    "status": status,
    "python": python,
}


def expectations_check(expect: Any, *, field: str) -> None:
    """Refuse an ``expect`` object a grader could not use (``InvalidInput`` naming
    ``field.grader``), before anything runs."""
    if not isinstance(expect, dict):
        raise InvalidInput("must be an object of graders", field=field)
    for name, arg in expect.items():
        where = f"{field}.{name}"
        if name not in GRADERS:
            raise InvalidInput(f"unknown grader; one of {', '.join(GRADERS)}", field=where)
        if name in ("max_tokens", "max_steps") and (
            isinstance(arg, bool) or not isinstance(arg, int)
        ):
            raise InvalidInput("must be an integer", field=where)
        if name == "max_cost" and (isinstance(arg, bool) or not isinstance(arg, int | float)):
            raise InvalidInput("must be a number", field=where)
        if name == "answer_matches":
            try:
                re.compile(str(arg))
            except re.error as exc:
                raise InvalidInput(f"is not a regular expression: {exc}", field=where) from None
        if name == "result_schema":
            try:
                jsonschema.validators.validator_for(arg).check_schema(arg)
            except jsonschema.SchemaError as exc:
                raise InvalidInput(f"is not a JSON Schema: {exc.message}", field=where) from None
        if name == "tools_called" and not (
            isinstance(arg, list) or (isinstance(arg, dict) and isinstance(arg.get("set"), list))
        ):
            raise InvalidInput('must be a list, or {"set": [...]}', field=where)
        if name == "python":
            path = arg.get("path") if isinstance(arg, dict) else arg
            try:
                import_string(str(path))
            except ImportError as exc:
                raise InvalidInput(f"cannot be imported: {exc}", field=where) from None


def grades_for(run: Run, expect: dict[str, Any]) -> list[Grade]:
    """Every grade of ``run`` under ``expect``; ``status`` defaults to ``completed``.
    A grader that raises fails with its error as the detail."""
    graders = {"status": "completed", **expect}
    grades = []
    for name, arg in graders.items():
        try:
            grades.append(GRADERS[name](run, arg))
        except Exception as exc:
            grades.append(Grade(name, False, 0.0, f"grader raised {type(exc).__name__}: {exc}"))
    return grades
