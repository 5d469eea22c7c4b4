"""MCP tool servers as tools: ``mcp:<server>/<tool>``, through the official ``mcp`` SDK.

An operator registers a server (``manage.py mcp_servers add``, ``mcp_server_add``): a
command the workers start over stdio, or a streamable-HTTP URL whose headers carry the
calling task owner's credentials. A server belongs to the deployment (every owner's
tasks may use it) or to one owner (only that owner's tasks see it; an owner's server
wins over the deployment's of the same name). Its tools join the registry under
``mcp:<server>/<tool>`` (``tools.registry.register_namespace``) with their JSON Schemas,
so any agent can allow them by name.

What a call goes through (``tools.runner`` runs it like any tool, and audits it with a
``tool_call`` and a ``tool_result`` event):

- **its arguments** are validated against the tool's ``inputSchema`` (``jsonschema``)
  before anything is sent; a bad one is a ``ToolArgumentError`` naming the field;
- **the breaker of its server**, ``mcp:<server>`` (an owner's own server:
  ``mcp:owner-<id>/<server>``), scoped per owner like every breaker (``tools.breakers``).
  A transport failure (the server does not start, refuses the connection, dies
  mid-call, does not answer in time) is a ``RetryableError`` and counts against it;
  an answer, even an error, does not;
- **the outbound policy** (``tools.outbound``) for an HTTP server, checked on every
  call: a URL that resolves to a loopback, private or metadata address is refused
  unless ``AGENTS_OUTBOUND_ALLOW`` lists it. (The SDK connects by name, so the address
  is checked, not pinned: see the README's "MCP tools" for what that leaves open.)
  The SDK follows only same-origin redirects;
- **the calling owner's credentials** for the headers (``--header
  Authorization=github_token`` sends the value of the task's credential
  ``github_token``), each only to a host it is bound to: a deployment server called by
  two owners sends each one's own credential, never the other's;
- **a time limit**: the server's ``timeout`` bounds connecting, calling and the answer;
- **recording**: its result is stored under the call's idempotency key
  (``ToolCallRecord``) as soon as it arrives, and a step that runs again uses it: a
  recorded call is never requested twice. (MCP has no idempotency of its own: a call
  whose worker died after sending it and before recording the answer is sent again.
  The key goes along in the request's ``_meta`` as ``idempotency_key`` for a server
  that can use it.)

Annotations set defaults: a tool whose ``destructiveHint`` is true, which MCP assumes
for a tool not marked ``readOnlyHint``, needs a person's approval before each call
(``needs_approval``; the server's ``approve`` setting, ``all`` or ``none``, says
otherwise); one marked ``readOnlyHint`` may run alongside the other calls of its step
(``parallel``).

Tool lists are discovered from the server when it is added and cached on its row;
``mcp_servers refresh`` reads them again, and so does the first lookup after
``AGENTS_MCP_TOOLS_TTL`` seconds (the old list is kept if the server cannot say). Each
process keeps the rows it read for ``AGENTS_MCP_CACHE_SECONDS``, so a server added,
refreshed or removed is seen by every worker within that time.

Each call opens its own session (a stdio server is started for the call and stopped
after it): nothing is shared between calls, tasks or owners, at the price of the
connection's start-up per call.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import jsonschema
import structlog
from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from agents_project.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PermanentError,
    RetryableError,
    ToolArgumentError,
)
from tools.credentials import NAME as CREDENTIAL_NAME
from tools.credentials import task_credentials
from tools.models import McpServer
from tools.outbound import OutboundRefused, outbound_check
from tools.registry import Tool, ToolContext, ToolFailed, register_namespace

if TYPE_CHECKING:
    from mcp import Client
    from mcp_types import CallToolResult

logger = structlog.get_logger(__name__)

PREFIX = "mcp:"
# Letters, digits and '-' (no '_' or '.'): the model's function name for a tool,
# ``mcp__<server>__<tool>``, then reads back without ambiguity (``wire_name``).
SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,39}$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
MAX_TIMEOUT = 600.0


class McpToolError(ToolFailed):
    """The server answered the call with an error result (``isError``): the call was
    made, so its result is recorded like any other."""


class McpUnavailable(RetryableError):
    """The server could not be reached, died mid-call, or did not answer in time."""


@dataclass(frozen=True)
class ServerSpec:
    """What a call needs of a server row (immutable, safe to share between threads)."""

    id: int
    name: str
    owner_id: int | None
    command: tuple[str, ...]
    url: str
    headers: Mapping[str, str]
    approve: str
    timeout: float

    @classmethod
    def of(cls, server: McpServer) -> ServerSpec:
        return cls(
            id=server.pk,
            name=server.name,
            owner_id=server.owner_id,
            command=tuple(server.command or ()),
            url=server.url,
            headers=dict(server.headers or {}),
            approve=server.approve,
            timeout=server.timeout,
        )

    @property
    def breaker(self) -> str:
        """``mcp:<name>``, or ``mcp:owner-<id>/<name>`` for an owner's own server."""
        if self.owner_id is None:
            return f"{PREFIX}{self.name}"
        return f"{PREFIX}owner-{self.owner_id}/{self.name}"


@dataclass(frozen=True)
class McpTool(Tool):
    """A tool of an MCP server: arguments checked against its ``inputSchema``."""

    server: ServerSpec | None = None
    remote_name: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict)

    def parameters_schema(self) -> dict[str, Any]:
        schema = dict(self.input_schema)
        schema.setdefault("type", "object")
        schema.setdefault("properties", {})
        return schema

    def validate(self, args: Any) -> dict[str, Any]:
        if not isinstance(args, Mapping):
            raise ToolArgumentError(self.name, "args", "must be an object")
        args = dict(args)
        validator = jsonschema.Draft202012Validator(self.parameters_schema())
        error = jsonschema.exceptions.best_match(validator.iter_errors(args))
        if error is not None:
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise ToolArgumentError(self.name, f"args{path}", error.message)
        return args


# --- calling a server -------------------------------------------------------------------


def _client(server: ServerSpec, headers: Mapping[str, str]) -> Client:
    # The SDK is imported on first use: it takes seconds, which every process (a
    # management command, the web process) would pay at start-up otherwise.
    import httpx2
    from mcp import Client, StdioServerParameters, stdio_client
    from mcp.client.streamable_http import streamable_http_client

    if server.command:
        params = StdioServerParameters(command=server.command[0], args=list(server.command[1:]))
        # The server's stderr goes to the process's own (a worker's log), not to
        # sys.stderr: Celery replaces that with a logging proxy that has no file number.
        errlog = sys.__stderr__ if sys.__stderr__ is not None else _devnull()
        return Client(stdio_client(params, errlog=errlog), read_timeout_seconds=server.timeout)
    http = httpx2.AsyncClient(headers=dict(headers), timeout=server.timeout, trust_env=False)
    return Client(
        streamable_http_client(server.url, http_client=http), read_timeout_seconds=server.timeout
    )


def _devnull() -> Any:
    return open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)


def _run(server: ServerSpec, headers: Mapping[str, str], what: str, work: Any) -> Any:
    """Run ``work(client)`` in a session of its own, within the server's timeout; map
    what goes wrong to ``McpUnavailable`` (transport) or ``PermanentError`` (an answer)."""
    import anyio
    from mcp import MCPError
    from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

    async def session() -> Any:
        with anyio.fail_after(server.timeout):
            async with _client(server, headers) as client:
                return await work(client)

    try:
        return anyio.run(session)
    except McpToolError:
        raise
    except TimeoutError:
        raise McpUnavailable(
            f"MCP server {server.name!r}: {what} took longer than {server.timeout:g}s"
        ) from None
    except MCPError as exc:
        if exc.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT):
            raise McpUnavailable(f"MCP server {server.name!r}: {what}: {exc.message}") from exc
        raise PermanentError(
            f"MCP server {server.name!r} refused {what}: {exc.message} (code {exc.code})"
        ) from exc
    except Exception as exc:
        # Transport failures (a process that exits, a refused connection, a dropped
        # stream) come out of the SDK's task groups in many shapes, often grouped.
        raise McpUnavailable(
            f"MCP server {server.name!r}: {what} failed: {_describe(exc)}"
        ) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"


def mcp_list_tools(server: ServerSpec, *, headers: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every tool the server lists (all pages): ``{name, description, input_schema,
    annotations}`` each. Raises ``McpUnavailable`` or ``PermanentError``."""
    if server.url:
        _outbound(server)

    async def listing(client: Client) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(100):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                annotations = tool.annotations
                tools.append(
                    {
                        "name": tool.name,
                        "description": tool.description or "",
                        "input_schema": tool.input_schema,
                        "annotations": (
                            annotations.model_dump(mode="json", by_alias=True, exclude_none=True)
                            if annotations is not None
                            else {}
                        ),
                    }
                )
            cursor = page.next_cursor
            if cursor is None:
                break
        return tools

    result: list[dict[str, Any]] = _run(server, headers, "listing its tools", listing)
    return result


def mcp_call(
    server: ServerSpec,
    tool: str,
    args: Mapping[str, Any],
    *,
    headers: Mapping[str, str],
    idempotency_key: str,
) -> Any:
    """Call ``tool`` on the server and return its result as JSON: the structured content
    if it gave one, else its text (one text block), else the content blocks. Raises
    ``McpToolError`` if the server answered with an error result, ``McpUnavailable``
    for a transport failure or time-out, ``PermanentError`` for a protocol refusal, and
    ``OutboundRefused`` (before anything is sent) for a URL the outbound policy refuses."""
    from mcp_types import RequestParamsMeta

    if server.url:
        _outbound(server)

    async def call(client: Client) -> CallToolResult:
        return await client.call_tool(
            tool, dict(args), meta=cast(RequestParamsMeta, {"idempotency_key": idempotency_key})
        )

    result: CallToolResult = _run(server, headers, f"calling {tool!r}", call)
    texts = [block.text for block in result.content if block.type == "text"]
    if result.is_error:
        raise McpToolError(f"{tool}: {' '.join(texts) or 'the tool reported an error'}")
    if result.structured_content is not None:
        return result.structured_content
    if len(texts) == len(result.content) == 1:
        return texts[0]
    return [
        block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content
    ]


def _outbound(server: ServerSpec) -> str:
    """The URL's host if the outbound policy allows it; else ``OutboundRefused``."""
    return outbound_check(server.url).host


def _headers(server: ServerSpec, credential: Any, tool: str) -> dict[str, str]:
    """The server's headers with the caller's credentials as values, each bound to the
    URL's host (``ToolContext.credential``'s rule)."""
    if not server.headers:
        return {}
    host = _outbound(server)
    return {
        header: credential(name, host=host, tool=tool, field=f"headers.{header}")
        for header, name in server.headers.items()
    }


def _as_tool(server: ServerSpec, spec: Mapping[str, Any]) -> McpTool:
    annotations = spec.get("annotations") or {}
    read_only = bool(annotations.get("readOnlyHint", False))
    # MCP's defaults: destructive unless said otherwise, and only meaningful when the
    # tool is not read-only.
    destructive = not read_only and bool(annotations.get("destructiveHint", True))
    needs_approval = server.approve == McpServer.Approve.ALL or (
        server.approve == McpServer.Approve.DESTRUCTIVE and destructive
    )
    name = f"{PREFIX}{server.name}/{spec['name']}"
    remote = str(spec["name"])

    def call(ctx: ToolContext, args: dict[str, Any]) -> Any:
        headers = _headers(server, ctx.credential, name)
        return mcp_call(server, remote, args, headers=headers, idempotency_key=ctx.idempotency_key)

    return McpTool(
        name=name,
        func=call,
        args={},
        timeout=server.timeout,
        side_effects=not read_only,
        breaker=server.breaker,
        description=(spec.get("description") or name).strip()[:1000],
        parallel=read_only,
        needs_approval=needs_approval,
        recorded=True,
        server=server,
        remote_name=remote,
        input_schema=spec.get("input_schema") or {},
    )


# --- the registry's view: which servers an owner's task sees --------------------------------

_rows: dict[tuple[int | None, str], tuple[float, ServerSpec | None, list[dict[str, Any]]]] = {}


def mcp_cache_clear() -> None:
    """Forget the rows this process read (tests; a command that changed them)."""
    _rows.clear()


def _visible(owner_id: int | None, name: str) -> tuple[ServerSpec | None, list[dict[str, Any]]]:
    key = (owner_id, name)
    cached = _rows.get(key)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1], cached[2]
    # The owner's own server of that name wins over the deployment's.
    candidates = McpServer.objects.filter(Q(owner__isnull=True) | Q(owner_id=owner_id), name=name)
    server = min(candidates, key=lambda s: s.owner_id is None, default=None)
    spec: ServerSpec | None = None
    tools: list[dict[str, Any]] = []
    if server is not None:
        tools = _fresh_tools(server, owner_id)
        spec = ServerSpec.of(server)
    _rows[key] = (time.monotonic() + settings.AGENTS["MCP_CACHE_SECONDS"], spec, tools)
    return spec, tools


def _fresh_tools(server: McpServer, owner_id: int | None) -> list[dict[str, Any]]:
    """The server's cached tool list, read again from the server if never read or older
    than ``AGENTS_MCP_TOOLS_TTL`` (the old list stays if it cannot be read)."""
    ttl = settings.AGENTS["MCP_TOOLS_TTL"]
    stale = server.discovered_at is None or (
        ttl > 0 and server.discovered_at < timezone.now() - timedelta(seconds=ttl)
    )
    if not stale:
        return list(server.tools)
    spec = ServerSpec.of(server)
    try:
        headers = _owner_headers(spec, owner_id, field="headers")
        tools = mcp_list_tools(spec, headers=headers)
    except (PermanentError, RetryableError, InvalidInput) as exc:
        logger.warning(
            "MCP server's tool list could not be refreshed", server=server.name, error=str(exc)
        )
        return list(server.tools)
    McpServer.objects.filter(pk=server.pk).update(tools=tools, discovered_at=timezone.now())
    return tools


def _resolve(name: str, owner_id: int | None) -> Tool | None:
    server_name, sep, tool_name = name[len(PREFIX) :].partition("/")
    if not sep or not SERVER_NAME.match(server_name):
        return None
    server, tools = _visible(owner_id, server_name)
    if server is None:
        return None
    spec = next((t for t in tools if t.get("name") == tool_name), None)
    return _as_tool(server, spec) if spec is not None else None


register_namespace(PREFIX, _resolve)


def mcp_tools_of(*, owner_id: int | None, server: str) -> list[McpTool]:
    """The tools of ``server`` as the owner's tasks see them (empty if it sees none)."""
    spec, tools = _visible(owner_id, server)
    return [] if spec is None else [_as_tool(spec, t) for t in tools]


# --- registering servers ------------------------------------------------------------------


def _owner_headers(server: ServerSpec, owner_id: int | None, *, field: str) -> dict[str, str]:
    """The headers filled with ``owner_id``'s own credentials (discovery, outside a task);
    ``InvalidInput`` on ``field`` if one is missing or not bound to the server's host."""
    if not server.headers:
        return {}
    if owner_id is None:
        raise InvalidInput("a deployment server's headers need a caller's credentials", field=field)
    credentials = task_credentials(_NO_TASK, owner_id)
    ctx = ToolContext(
        task_id=_NO_TASK,
        owner_id=owner_id,
        step=0,
        call_index=0,
        timeout=server.timeout,
        credentials={n: v for n, (v, _) in credentials.items()},
        credential_hosts={n: h for n, (_, h) in credentials.items()},
    )
    try:
        return _headers(server, ctx.credential, f"{PREFIX}{server.name}")
    except ToolArgumentError as exc:
        raise InvalidInput(str(exc), field=field) from None


# No task has this id: ``task_credentials`` then returns only the owner's own credentials.
_NO_TASK = uuid.UUID(int=0)


def _parse_headers(headers: Any) -> dict[str, str]:
    """``["Authorization=github_token"]`` (or a dict) -> ``{"Authorization": "github_token"}``."""
    if isinstance(headers, Mapping):
        pairs = list(headers.items())
    elif isinstance(headers, Sequence) and not isinstance(headers, str):
        pairs = []
        for entry in headers:
            if not isinstance(entry, str) or "=" not in entry:
                raise InvalidInput("must be NAME=CREDENTIAL_NAME", field="headers")
            header, _, credential = entry.partition("=")
            pairs.append((header.strip(), credential.strip()))
    else:
        raise InvalidInput("must be a list of NAME=CREDENTIAL_NAME", field="headers")
    parsed: dict[str, str] = {}
    for header, credential in pairs:
        if not isinstance(header, str) or not HEADER_NAME.match(header):
            raise InvalidInput(f"{header!r} is not an HTTP header name", field="headers")
        if not isinstance(credential, str) or not CREDENTIAL_NAME.match(credential):
            raise InvalidInput(
                f"{credential!r} is not a credential name", field=f"headers.{header}"
            )
        parsed[header] = credential
    return parsed


def mcp_server_add(
    *,
    name: Any,
    command: Any = None,
    url: Any = None,
    owner: User | None = None,
    headers: Any = (),
    approve: Any = McpServer.Approve.DESTRUCTIVE,
    timeout: Any = None,
    actor: str,
) -> McpServer:
    """Register an MCP server for ``owner`` (None: the deployment) and discover its tools.

    Exactly one of ``command`` (a command line, split like a shell would, run without a
    shell) or ``url`` (streamable HTTP, checked against the outbound policy).
    ``headers``: ``NAME=CREDENTIAL_NAME`` pairs, HTTP only; an owner's server needs
    those credentials now (its tools are listed with them); a deployment server's are
    the calling owner's, and its tools are listed at the first lookup of a task whose
    owner has them. ``approve``: ``destructive`` (default), ``all`` or ``none``.

    Every field is checked and the tools listed before anything is written
    (``InvalidInput`` naming the field, also when the server cannot be reached);
    ``Conflict`` if the name is taken in that scope.
    """
    if not isinstance(name, str) or not SERVER_NAME.match(name):
        raise InvalidInput("must be 1-40 letters, digits or '-', starting with one", field="name")
    if (command is None) == (url is None):
        raise InvalidInput("give exactly one of command or url", field="command")
    argv: tuple[str, ...] = ()
    if command is not None:
        try:
            argv = tuple(shlex.split(command)) if isinstance(command, str) else ()
        except ValueError as exc:
            raise InvalidInput(f"is not a command line: {exc}", field="command") from None
        if not argv:
            raise InvalidInput("must be a command line", field="command")
    if url is not None:
        if not isinstance(url, str) or len(url) > 2000:
            raise InvalidInput("must be an http(s) URL", field="url")
        try:
            outbound_check(url)
        except OutboundRefused as exc:
            raise InvalidInput(str(exc), field="url") from None
    parsed = _parse_headers(headers)
    if parsed and command is not None:
        raise InvalidInput("only an HTTP server has headers", field="headers")
    if approve not in McpServer.Approve.values:
        raise InvalidInput(f"must be one of {', '.join(McpServer.Approve.values)}", field="approve")
    seconds = settings.AGENTS["MCP_CALL_TIMEOUT"] if timeout is None else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidInput("must be a number of seconds", field="timeout")
    if not 0 < seconds <= MAX_TIMEOUT:
        raise InvalidInput(f"must be above 0 and at most {MAX_TIMEOUT:g}", field="timeout")
    owner_id = owner.pk if owner is not None else None
    if McpServer.objects.filter(owner_id=owner_id, name=name).exists():
        raise Conflict(f"an MCP server {name!r} is already registered", field="name")
    server = McpServer(
        name=name,
        owner_id=owner_id,
        command=list(argv),
        url=url or "",
        headers=parsed,
        approve=approve,
        timeout=float(seconds),
    )
    spec = ServerSpec.of(server)
    if not parsed or owner_id is not None:
        field_name = "command" if command is not None else "url"
        try:
            server.tools = mcp_list_tools(
                spec, headers=_owner_headers(spec, owner_id, field="headers")
            )
        except (PermanentError, RetryableError) as exc:
            raise InvalidInput(
                f"the server's tools could not be listed: {exc}", field=field_name
            ) from None
        server.discovered_at = timezone.now()
    try:
        with transaction.atomic():
            server.save(force_insert=True)
    except IntegrityError:
        raise Conflict(f"an MCP server {name!r} is already registered", field="name") from None
    mcp_cache_clear()
    logger.info(
        "MCP server registered",
        server=name,
        owner=owner.get_username() if owner is not None else None,
        transport="stdio" if argv else "http",
        tools=len(server.tools),
        actor=actor,
    )
    return server


def _server_of(name: str, owner: User | None) -> McpServer:
    server = McpServer.objects.filter(
        name=name, owner_id=owner.pk if owner is not None else None
    ).first()
    if server is None:
        whose = f" of {owner.get_username()}" if owner is not None else " of the deployment"
        raise NotFound(f"no MCP server {name!r}{whose}", field="name")
    return server


def mcp_server_remove(*, name: str, owner: User | None = None, actor: str) -> None:
    """Remove the server; its tools are gone for new lookups (other processes: within
    ``AGENTS_MCP_CACHE_SECONDS``). ``NotFound`` if there is none by that name and scope."""
    _server_of(name, owner).delete()
    mcp_cache_clear()
    logger.info("MCP server removed", server=name, actor=actor)


def mcp_server_refresh(*, name: str, owner: User | None = None, actor: str) -> McpServer:
    """Read the server's tool list again (a deployment server with headers: with
    ``owner``'s credentials, ``owner`` then being the caller, not the server's scope).
    ``InvalidInput`` if the server cannot say; the old list is kept then."""
    server = McpServer.objects.filter(name=name, owner_id=owner.pk if owner else None).first()
    if server is None and owner is not None:
        server = McpServer.objects.filter(name=name, owner__isnull=True).first()
    if server is None:
        raise NotFound(f"no MCP server {name!r}", field="name")
    spec = ServerSpec.of(server)
    field_name = "command" if spec.command else "url"
    try:
        headers = _owner_headers(spec, owner.pk if owner else None, field="headers")
        tools = mcp_list_tools(spec, headers=headers)
    except (PermanentError, RetryableError) as exc:
        raise InvalidInput(
            f"the server's tools could not be listed: {exc}", field=field_name
        ) from None
    server.tools = tools
    server.discovered_at = timezone.now()
    server.save(update_fields=["tools", "discovered_at"])
    mcp_cache_clear()
    logger.info("MCP server's tools refreshed", server=name, tools=len(tools), actor=actor)
    return server


def mcp_servers_visible(*, owner: User | None) -> QuerySet[McpServer]:
    """The deployment's servers and ``owner``'s own (None: every server, for operators)."""
    servers = McpServer.objects.select_related("owner")
    if owner is not None:
        servers = servers.filter(Q(owner__isnull=True) | Q(owner_id=owner.pk))
    return servers.order_by("name", "owner_id")


def mcp_server_as_dict(server: McpServer) -> dict[str, Any]:
    """A server for listings (no secrets: header values are credential names)."""
    return {
        "name": server.name,
        "owner": server.owner.get_username() if server.owner_id and server.owner else None,
        "transport": "stdio" if server.command else "http",
        "command": shlex.join(server.command) if server.command else None,
        "url": server.url or None,
        "headers": dict(server.headers),
        "approve": server.approve,
        "timeout": server.timeout,
        "tools": [f"{PREFIX}{server.name}/{t['name']}" for t in server.tools],
        "discovered_at": server.discovered_at.isoformat() if server.discovered_at else None,
    }
