"""Built-in tools: ``ledger.append``, ``calc``, ``http.get``, ``kv.set`` and ``kv.get``."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from agents_project.errors import InvalidInput, RetryableError, ToolArgumentError
from tools.models import LedgerEntry
from tools.outbound import outbound_check, outbound_get
from tools.registry import Arg, ToolContext, tool
from tools.selectors import kv_get
from tools.services import kv_set

JSON_VALUE = (str, int, float, bool, list, dict, type(None))


@tool(
    "ledger.append",
    args={"key": Arg(str), "value": Arg(JSON_VALUE)},
    side_effects=True,
    timeout=5.0,
    # Appends under distinct keys commute: concurrent calls cannot change each other.
    parallel=True,
)
def ledger_append(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Record ``value`` under ``key``, once per idempotency key however often it is called."""
    entry, _ = LedgerEntry.objects.get_or_create(
        idempotency_key=ctx.idempotency_key,
        defaults={
            "task_id": ctx.task_id,
            "owner_id": ctx.owner_id,
            "key": args["key"],
            "value": args["value"],
        },
    )
    return {"entry": entry.pk, "key": entry.key, "value": entry.value}


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_MAX_MAGNITUDE = 1e100


@tool(
    "calc",
    args={"expression": Arg(str)},
    timeout=1.0,
    parallel=True,
    credentials=False,
    local=True,
)
def calc(ctx: ToolContext, args: dict[str, Any]) -> int | float:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses)."""
    expression = args["expression"]
    if len(expression) > 500:
        raise ToolArgumentError("calc", "args.expression", "is longer than 500 characters")
    try:
        tree = ast.parse(expression, mode="eval")
        return _evaluate(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as exc:
        raise ToolArgumentError("calc", "args.expression", str(exc) or "is not valid") from exc


def _evaluate(node: ast.AST) -> int | float:
    result: int | float
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise ValueError("booleans are not numbers here")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        result = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        result = _UNARY[type(node.op)](_evaluate(node.operand))
    else:
        raise ValueError(f"unsupported expression element {type(node).__name__}")
    if isinstance(result, complex) or abs(result) > _MAX_MAGNITUDE:
        raise ValueError("result out of range")
    return result


def _http_breaker(args: dict[str, Any]) -> str:
    """One circuit breaker per host and port: ``http:<host>:<port>`` (scoped per owner
    by the runner, ``tools.breakers``)."""
    parts = urlsplit(args["url"])
    try:
        port = parts.port
    except ValueError:
        raise ToolArgumentError("http.get", "args.url", "has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolArgumentError("http.get", "args.url", "must be an http(s) URL with a host")
    return f"http:{parts.hostname}:{port or (443 if parts.scheme == 'https' else 80)}"


@tool(
    "http.get",
    args={
        "url": Arg(str),
        "timeout": Arg((int, float), required=False),
        "bearer": Arg(str, required=False),
    },
    timeout=10.0,
    breaker=_http_breaker,
    parallel=True,
)
def http_get(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """GET a URL through its host's circuit breakers, under the outbound policy.

    The call goes through the task owner's own breaker on the host
    (``http:<host>:<port>@owner:<id>``) inside the host-wide one, which opens only
    when failures come from several owners (``tools.breakers.breaker_call``): one
    tenant calling a failing path on another tenant's host trips only its own breaker.

    The URL must pass ``tools.outbound`` (no loopback, private, link-local or metadata
    address unless allowed; every redirect hop checked; body at most
    ``AGENTS_OUTBOUND_MAX_BYTES``), else the step fails permanently. 5xx, timeouts and
    connection errors are retryable failures (and count against the breaker); any
    other status is a result. ``bearer`` names one of the task's credentials, sent as
    ``Authorization: Bearer <value>`` if the credential may go to this host.
    """
    url = args["url"]
    timeout = _bounded_timeout(args["timeout"], ctx.timeout)
    target = outbound_check(url)
    headers: dict[str, str] = {}
    if args["bearer"] is not None:
        token = ctx.credential(
            args["bearer"], host=target.host, tool="http.get", field="args.bearer"
        )
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = outbound_get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RetryableError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500:
        raise RetryableError(f"GET {url}: HTTP {response.status_code}")
    return {
        "status": response.status_code,
        "content_type": response.headers.get("content-type", ""),
        "body": response.text[:65536],
    }


def _bounded_timeout(asked: Any, limit: float) -> float:
    """The caller's timeout in seconds, if a finite number above 0, at most the tool's."""
    if asked is None:
        return limit
    if not math.isfinite(asked) or asked <= 0:
        raise ToolArgumentError("http.get", "args.timeout", "must be a number of seconds above 0")
    return min(float(asked), limit)


_SCOPES = ("task", "owner")
_KV_ARGS = {"key": Arg(str), "scope": Arg(str, required=False, default="task")}


def _kv_scope(ctx: ToolContext, args: dict[str, Any], tool_name: str) -> tuple[int, Any]:
    if not 0 < len(args["key"]) <= 200:
        raise ToolArgumentError(tool_name, "args.key", "must be 1 to 200 characters")
    if args["scope"] not in _SCOPES:
        raise ToolArgumentError(tool_name, "args.scope", "must be task or owner")
    return ctx.owner_id, (ctx.task_id if args["scope"] == "task" else None)


@tool(
    "kv.set",
    args={**_KV_ARGS, "value": Arg(JSON_VALUE)},
    side_effects=True,
    timeout=5.0,
)
def kv_set_tool(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Keep ``value`` under ``key``: for this task only (``scope`` "task", the default),
    or for every task of the same owner ("owner"). Never visible to another owner."""
    owner_id, task_id = _kv_scope(ctx, args, "kv.set")
    try:
        kv_set(owner_id=owner_id, task_id=task_id, key=args["key"], value=args["value"])
    except InvalidInput as exc:
        raise ToolArgumentError("kv.set", f"args.{exc.field}", exc.message) from None
    return {"key": args["key"], "scope": args["scope"]}


@tool("kv.get", args=_KV_ARGS, timeout=5.0, parallel=True)
def kv_get_tool(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Read what ``kv.set`` kept under ``key`` in the same scope."""
    owner_id, task_id = _kv_scope(ctx, args, "kv.get")
    found, value = kv_get(owner_id=owner_id, task_id=task_id, key=args["key"])
    return {"key": args["key"], "scope": args["scope"], "found": found, "value": value}
