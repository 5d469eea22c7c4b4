"""The tool registry: what an agent can call, and how each tool must be called.

A tool declares its name, an argument schema (checked before the call, so a bad call
fails the step with an error naming the field), a timeout, a retry budget, whether it
has side effects (then it must honour ``ctx.idempotency_key``), the circuit breaker
guarding its dependency, and a cheap availability probe for readiness checks::

    def weather_probe() -> None:  # raises if the service cannot be used now
        httpx.get("https://weather.example/health", timeout=2).raise_for_status()

    @tool("weather.today", args={"city": Arg(str)}, timeout=5.0, breaker="weather-api",
          probe=weather_probe)
    def weather_today(ctx: ToolContext, args: dict) -> dict:
        key = ctx.credentials["weather_key"]  # this task's own credential
        ...

``breaker`` is a name, or a function of the validated arguments returning one (so
``http.get`` has a breaker per host); it may raise ``ToolArgumentError``. A tool reports
an unhealthy dependency by raising ``RetryableError`` (see ``tools.breakers``).

A test swaps a tool by registering a stand-in under the same name (``replace=True``).

Besides the tools defined in code, a namespace of tools may come from elsewhere
(``register_namespace``): ``mcp:<server>/<tool>`` names resolve to the tools of the MCP
servers an owner may use (``tools.mcp``). Such a lookup depends on whose task asks:
``find_tool(name, owner_id=...)``, or the owner set with ``tool_owner`` around code
that cannot pass it (an agent's ``validate_input`` when a task is started).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from agents_project.errors import PermanentError, ToolArgumentError


class ToolFailed(PermanentError):
    """The tool ran and reported a failure (an MCP tool's error result): the call was
    made, so a recorded tool keeps this failure as its result, like a success."""


@dataclass(frozen=True)
class ToolCall:
    """A request to run the tool ``name`` with ``args``."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What a tool call returned (``ok``) or why it failed (``error``)."""

    name: str
    args: Mapping[str, Any]
    ok: bool
    value: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Arg:
    """One argument: its JSON type(s), whether it must be given, its default."""

    type: type | tuple[type, ...] = object
    required: bool = True
    default: Any = None


@dataclass(frozen=True)
class ToolContext:
    """What a tool call may know about its caller. Nothing here crosses sessions."""

    task_id: UUID
    owner_id: int
    step: int
    call_index: int
    timeout: float
    # Decrypted credentials of this task's owner (or of this task alone), by name.
    credentials: Mapping[str, str] = field(default_factory=dict)
    # The hosts each credential is bound to (``*``: any allowed host; empty: none).
    credential_hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def credential(self, name: str, *, host: str, tool: str, field: str) -> str:
        """The credential ``name``, to be sent to ``host``. Raises ``ToolArgumentError``
        on ``field`` if the task has none by that name, or if the credential is bound
        to other hosts (``credentials set --host``): it never leaves for another one. A
        credential bound to no host (stored before hosts were required) goes nowhere;
        one set with ``--any-host`` (hosts ``["*"]``) goes to any allowed host."""
        value = self.credentials.get(name)
        if value is None:
            raise ToolArgumentError(tool, field, f"this task has no credential {name!r}")
        bound = self.credential_hosts.get(name, ())
        host = host.lower().rstrip(".")
        if not bound:
            # Stored before hosts were required (check --deploy lists these): never sent.
            raise ToolArgumentError(
                tool,
                field,
                f"credential {name!r} is bound to no host: set it again with "
                "'credentials set --host HOST' (or --any-host)",
            )
        if not any(fnmatch.fnmatchcase(host, pattern) for pattern in bound):
            raise ToolArgumentError(
                tool,
                field,
                f"credential {name!r} may only be sent to {', '.join(bound)}, not to {host}",
            )
        return value

    @property
    def idempotency_key(self) -> str:
        """``task id : step : call index``, the same on every redelivery of this step."""
        return f"{self.task_id}:{self.step}:{self.call_index}"


ToolFunc = Callable[[ToolContext, dict[str, Any]], Any]
BreakerName = str | Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class Tool:
    name: str
    func: ToolFunc
    args: Mapping[str, Arg]
    timeout: float = 10.0
    side_effects: bool = False
    max_retries: int | None = None
    breaker: BreakerName | None = None
    probe: Callable[[], None] | None = None
    description: str = ""
    # May run at the same time as other calls of the same step (read-only: MCP's
    # ``readOnlyHint``); calls that may not run one after another, in their order.
    parallel: bool = False
    # Every call needs a person's approval first (MCP's ``destructiveHint``); the
    # built-in agents ask before calling it.
    needs_approval: bool = False
    # Its result is recorded under the call's idempotency key and reused, never asked
    # for again (a tool that cannot honour the key itself, like every MCP tool).
    recorded: bool = False
    # It may read the task's credentials (``ctx.credentials``). False: it never does,
    # and a step whose calls are all such tools does not read or decrypt them (nothing
    # of theirs can reach its results to be masked).
    credentials: bool = True
    # A local tool (as Temporal calls its short activities run by the workflow's own
    # worker): quick, pure computation, no network, no credentials. The model gateway
    # runs a reply's local tools itself rather than sending the step back to a worker.
    local: bool = False

    def parameters_schema(self) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12) of this tool's arguments: what a model is
        offered, and what an edited call is checked against (``agents.approvals``)."""
        properties = {name: json_schema_of(arg.type) for name, arg in self.args.items()}
        required = [name for name, arg in self.args.items() if arg.required]
        return {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }

    def breaker_for(self, args: dict[str, Any]) -> str | None:
        """The name of the breaker guarding this call, if any."""
        return self.breaker(args) if callable(self.breaker) else self.breaker

    def validate(self, args: Any) -> dict[str, Any]:
        """The arguments with defaults filled in, or ``ToolArgumentError`` naming the field.

        An optional argument given as ``null`` counts as not given (models send it so).
        Validating arguments this returned returns them unchanged (an agent validates a
        model's call, then the tool runner validates the filled arguments again): every
        default is ``None`` or of its argument's type, which ``tool`` checks."""
        if not isinstance(args, Mapping):
            raise ToolArgumentError(self.name, "args", "must be an object")
        unknown = sorted(set(args) - set(self.args))
        if unknown:
            raise ToolArgumentError(self.name, f"args.{unknown[0]}", "is not an argument")
        clean: dict[str, Any] = {}
        for name, spec in self.args.items():
            if name not in args:
                if spec.required:
                    raise ToolArgumentError(self.name, f"args.{name}", "is required")
                clean[name] = spec.default
                continue
            value = args[name]
            if value is None and not spec.required:
                clean[name] = spec.default
                continue
            if not _is_instance(value, spec.type):
                raise ToolArgumentError(
                    self.name, f"args.{name}", f"must be {_type_name(spec.type)}"
                )
            clean[name] = value
        return clean


_JSON_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
    type(None): "null",
}


def json_schema_of(expected: type | tuple[type, ...]) -> dict[str, Any]:
    """The JSON Schema of an ``Arg`` type: ``str`` -> ``{"type": "string"}``."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if object in types or all(t in types for t in _JSON_TYPES):
        return {}
    names = sorted({_JSON_TYPES[t] for t in types if t in _JSON_TYPES})
    if "integer" in names and "number" in names:
        names.remove("integer")
    return {"type": names[0]} if len(names) == 1 else {"type": names}


def _is_instance(value: Any, expected: type | tuple[type, ...]) -> bool:
    # JSON has no separate bool: True is not a number here.
    if isinstance(value, bool) and bool not in _as_tuple(expected):
        return expected is object
    return isinstance(value, expected)


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _type_name(expected: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(expected))


_REGISTRY: dict[str, Tool] = {}


def tool(
    name: str,
    *,
    args: Mapping[str, Arg],
    timeout: float = 10.0,
    side_effects: bool = False,
    max_retries: int | None = None,
    breaker: BreakerName | None = None,
    probe: Callable[[], None] | None = None,
    parallel: bool = False,
    recorded: bool = False,
    credentials: bool = True,
    local: bool = False,
    replace: bool = False,
) -> Callable[[ToolFunc], ToolFunc]:
    """Register the decorated function as the tool ``name``. ``credentials=False``: it
    never reads ``ctx.credentials`` (they are then not loaded for it). ``local=True``:
    it is quick (well under a second), pure and offline, so the model gateway may run
    it on its own threads, which no hard time limit guards (``llm.gateway``); it then
    reads no credentials either. ``ValueError`` for a local tool with side effects or
    credentials."""
    if local and (side_effects or credentials):
        raise ValueError(
            f"tool {name!r}: a local tool has no side effects and reads no credentials"
        )

    def decorator(func: ToolFunc) -> ToolFunc:
        if name in _REGISTRY and not replace:
            raise ValueError(f"tool {name!r} is already registered")
        for arg_name, spec in args.items():
            default = spec.default
            if not spec.required and default is not None and not _is_instance(default, spec.type):
                raise ValueError(
                    f"tool {name!r}: the default of argument {arg_name!r} must be None "
                    f"or {_type_name(spec.type)}"
                )
        _REGISTRY[name] = Tool(
            name=name,
            func=func,
            args=dict(args),
            timeout=timeout,
            side_effects=side_effects,
            max_retries=max_retries,
            breaker=breaker,
            probe=probe,
            description=(func.__doc__ or "").strip().split("\n")[0],
            parallel=parallel,
            recorded=recorded,
            credentials=credentials,
            local=local,
        )
        return func

    return decorator


# prefix -> resolver(name, owner id) of the tools whose names start with it.
Resolver = Callable[[str, int | None], Tool | None]
_NAMESPACES: dict[str, Resolver] = {}
_owner: ContextVar[int | None] = ContextVar("tool_owner", default=None)


def register_namespace(prefix: str, resolver: Resolver) -> None:
    """Resolve every tool name starting with ``prefix`` (``"mcp:"``) with ``resolver``,
    given the name and the owner whose task asks (None: nobody's; only what every
    owner may use)."""
    _NAMESPACES[prefix] = resolver


@contextlib.contextmanager
def tool_owner(owner_id: int | None) -> Iterator[None]:
    """Within the block, ``find_tool`` without ``owner_id`` looks up as this owner."""
    token = _owner.set(owner_id)
    try:
        yield
    finally:
        _owner.reset(token)


def find_tool(name: str, *, owner_id: int | None = None) -> Tool | None:
    """The tool ``name`` as the task of ``owner_id`` (default: ``tool_owner``'s) sees it,
    or None. A namespaced tool's resolver may raise ``ToolArgumentError`` (its server's
    tool list could not be read)."""
    tool = _REGISTRY.get(name)
    if tool is not None:
        return tool
    for prefix, resolver in _NAMESPACES.items():
        if name.startswith(prefix):
            return resolver(name, owner_id if owner_id is not None else _owner.get())
    return None


def registered_tools() -> Mapping[str, Tool]:
    return dict(_REGISTRY)
