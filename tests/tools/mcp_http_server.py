"""An MCP server of the tests' own, over streamable HTTP on 127.0.0.1, built with the
SDK's ``MCPServer``. Run as a person would run it::

    python tests/tools/mcp_http_server.py PORT CALLS_FILE

Every call appends a JSON line to CALLS_FILE (the tool, its arguments, the
``Authorization`` header it received, the ``idempotency_key`` of the request's
``_meta``), so a test counts the requests a server really received, across restarts.

Tools: ``echo`` (read-only), ``append`` (a side effect: not read-only, not
destructive), ``erase`` (destructive), ``whoami`` (read-only: the Authorization header
it got), ``gather`` (read-only: waits until N calls of it are in flight at once, at most
10 s, and answers how many were), ``die`` (the process exits in the middle of the call,
once per marker file: the next start of the server answers it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations

READ_ONLY = ToolAnnotations(read_only_hint=True)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True)

server = MCPServer("test-http")
calls_file = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("calls.jsonl")
_lock = threading.Lock()
_in_flight = 0


def _log(tool: str, args: dict[str, Any], ctx: Context) -> None:
    request = ctx.request_context.request
    headers = getattr(request, "headers", {}) or {}
    meta = ctx.request_context.meta or {}
    key = (
        meta.get("idempotency_key")
        if isinstance(meta, dict)
        else getattr(meta, "idempotency_key", None)
    )
    line = {
        "tool": tool,
        "args": args,
        "authorization": headers.get("authorization"),
        "idempotency_key": key,
    }
    with _lock, calls_file.open("a") as out:
        out.write(json.dumps(line) + "\n")


@server.tool(annotations=READ_ONLY)
def echo(text: str, ctx: Context) -> str:
    """Say the text back."""
    _log("echo", {"text": text}, ctx)
    return text


@server.tool(annotations=WRITES)
def append(key: str, value: int, ctx: Context) -> dict[str, Any]:
    """Append a value under a key (counted in the calls file)."""
    _log("append", {"key": key, "value": value}, ctx)
    return {"key": key, "value": value}


@server.tool(annotations=DESTRUCTIVE)
def erase(key: str, ctx: Context) -> str:
    """Erase a key."""
    _log("erase", {"key": key}, ctx)
    return f"erased {key}"


@server.tool(annotations=READ_ONLY)
def whoami(ctx: Context) -> str:
    """The Authorization header this call carried."""
    _log("whoami", {}, ctx)
    request = ctx.request_context.request
    return str(getattr(request, "headers", {}).get("authorization"))


@server.tool(annotations=READ_ONLY)
async def gather(n: int, ctx: Context) -> int:
    """Wait until n calls of gather are in flight (at most 10 s); say how many were."""
    global _in_flight
    _log("gather", {"n": n}, ctx)
    _in_flight += 1
    seen = _in_flight
    try:
        for _ in range(1000):
            seen = max(seen, _in_flight)
            if _in_flight >= n:
                break
            await anyio.sleep(0.01)
        return seen
    finally:
        await anyio.sleep(0.05)
        _in_flight -= 1


@server.tool(annotations=WRITES)
def die(marker: str, ctx: Context) -> str:
    """Exit the process mid-call the first time (creating the marker file); then answer."""
    _log("die", {"marker": marker}, ctx)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return "survived"
    time.sleep(0.1)
    os._exit(3)


if __name__ == "__main__":
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
