"""Secrets never reach the audit trail: payloads pass through ``redact`` on the way in.

Two rules: any value under a key that names a secret is masked, and any string equal
to or containing a secret registered for the current task (its decrypted credentials,
see ``tools.credentials``) is masked wherever it appears.

While a task's tools run, its secrets are also held in ``secrets_scope`` so that every
log line written meanwhile (by the tools, or libraries they use) is masked by the log
formatter (``agents_project.logs``), not only what reaches the audit trail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

MASK = "[redacted]"
_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|token|api[_-]?key|authori[sz]ation|credential|private[_-]?key|cookie)",
    re.IGNORECASE,
)


def redact(value: Any, *, secrets: Iterable[str] = ()) -> Any:
    """A copy of ``value`` (JSON-like) with secret-looking keys and known secrets masked."""
    known = tuple(s for s in secrets if s)
    return _redact(value, known)


def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, secrets) for v in value]
    if isinstance(value, str) and secrets:
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, MASK)
    return value


_ACTIVE: ContextVar[tuple[str, ...]] = ContextVar("active_secrets", default=())


@contextmanager
def secrets_scope(secrets: Iterable[str]) -> Iterator[None]:
    """Mask ``secrets`` in every log line written inside the block (same thread/context)."""
    token = _ACTIVE.set(tuple(s for s in secrets if s))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_secrets() -> tuple[str, ...]:
    return _ACTIVE.get()
