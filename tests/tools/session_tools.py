"""Tools that show what a session sees of its credentials, for the isolation tests.

Imported by the tests and, through ``AGENTS_MODULES``, by their worker processes. Each
tool is careless with the secret on purpose (logs it, returns it, puts it in an error)
so that the tests can prove the runtime masks it everywhere.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import structlog

from tools.registry import Arg, ToolContext, tool

logger = structlog.get_logger(__name__)
stdlib_logger = logging.getLogger("tests.session_tools")


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@tool("session.peek", args={}, timeout=5.0)
def session_peek(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """The names of this task's credentials, their digests, and (carelessly) one value."""
    raw = ctx.credentials.get("api_key", "")
    logger.info("session.peek read a credential", value=raw)
    stdlib_logger.warning("session.peek sending key %s", raw)
    return {
        "names": sorted(ctx.credentials),
        "digests": sorted([name, digest(value)] for name, value in ctx.credentials.items()),
        "raw": raw,
    }


class KeyRejected(Exception):
    """An error that renders its text from an attribute, as some client libraries do."""

    def __init__(self, key: str) -> None:
        super().__init__("the upstream service rejected a key")
        self.key = key

    def __str__(self) -> str:
        return f"the upstream service rejected key {self.key}"


@tool("session.leak", args={"how": Arg(str)}, timeout=5.0, max_retries=0)
def session_leak(ctx: ToolContext, args: dict[str, Any]) -> None:
    """Fail with the credential in the error: in its message, or rendered from elsewhere."""
    raw = ctx.credentials["api_key"]
    if args["how"] == "message":
        raise RuntimeError(f"upstream said 401 for key {raw}")
    raise KeyRejected(raw)


def _forms() -> dict[str, Any]:
    import base64
    import json
    from urllib.parse import quote

    return {
        "escaped": lambda v: repr(v)[1:-1],
        "json": lambda v: json.dumps(v)[1:-1],
        "unicode_escape": lambda v: v.encode("unicode_escape").decode(),
        "base64": lambda v: base64.b64encode(v.encode()).decode(),
        "basic_auth": lambda v: base64.b64encode(f"user:{v}".encode()).decode(),
        "urlsafe_base64": lambda v: base64.urlsafe_b64encode(v.encode()).decode(),
        "url_encoded": lambda v: quote(v, safe=""),
        "reversed": lambda v: v[::-1],
        "stripped": lambda v: v.strip(),
        "first_line": lambda v: v.splitlines()[0],
        "last_line": lambda v: v.splitlines()[-1],
    }


ECHO_FORMS = tuple(_forms())


def echo_form(form: str, value: str) -> str:
    """The credential ``value`` as a careless server or library shows it (``form``)."""
    return str(_forms()[form](value))


@tool("session.echo", args={"form": Arg(str), "fail": Arg(bool)}, timeout=5.0, max_retries=0)
def session_echo(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Echo the credential transformed, in a result or (``fail``) in an error and a log."""
    shown = echo_form(args["form"], ctx.credentials["api_key"])
    stdlib_logger.warning("upstream echoed %s", shown)
    if args["fail"]:
        raise RuntimeError(f"upstream refused the request: {shown}")
    return {"echo": shown}
