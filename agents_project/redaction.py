"""Secrets never reach the audit trail: payloads pass through ``redact`` on the way in.

Two rules: any value under a key that names a secret is masked, and any string equal
to or containing a secret registered for the current task (its decrypted credentials,
see ``tools.credentials``), in any of the forms it takes in error texts and responses
(escaped, base64, percent-encoded, reversed, stripped, one line of it: ``secret_forms``),
is masked wherever it appears.

While a task's tools run, its secrets are also held in ``secrets_scope`` so that every
log line written meanwhile (by the tools, or libraries they use) is masked by the log
formatter (``agents_project.logs``), not only what reaches the audit trail.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "[redacted]"
_SECRET_KEY = re.compile(
    # "token", "access_token" are secrets; token counts ("prompt_tokens") are not.
    r"(pass(word|wd)?|secret|token(?!s)|api[_-]?key|authori[sz]ation|credential|private[_-]?key|cookie)",
    re.IGNORECASE,
)


# A form of a secret shorter than this is not masked on its own: it would mask ordinary
# text (credentials themselves are at least 8 characters, tools.credentials).
MIN_FORM_LENGTH = 6


def redact(value: Any, *, secrets: Iterable[str] = ()) -> Any:
    """A copy of ``value`` (JSON-like) with secret-looking keys and known secrets masked.

    Each secret is masked in every form it takes in error messages and responses
    (``secret_forms``). Nesting of any depth is walked without recursion, so no value
    can make it raise ``RecursionError``.
    """
    forms = _all_forms(tuple(s for s in secrets if s))
    if not isinstance(value, dict | list | tuple):
        return _redact_scalar(value, forms)
    root: list[Any] = [None]
    # (container to read, where its copy goes: (parent copy, key)).
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        source, parent, slot = stack.pop()
        if isinstance(source, dict):
            copy: Any = {}
            parent[slot] = copy
            for key, item in source.items():
                if isinstance(key, str) and _SECRET_KEY.search(key):
                    copy[key] = MASK
                elif isinstance(item, dict | list | tuple):
                    copy[key] = None
                    stack.append((item, copy, key))
                else:
                    copy[key] = _redact_scalar(item, forms)
        else:
            copy = [None] * len(source)
            parent[slot] = copy
            for index, item in enumerate(source):
                if isinstance(item, dict | list | tuple):
                    stack.append((item, copy, index))
                else:
                    copy[index] = _redact_scalar(item, forms)
    return root[0]


def _redact_scalar(value: Any, forms: tuple[str, ...]) -> Any:
    if isinstance(value, str) and forms:
        for form in forms:
            if form in value:
                value = value.replace(form, MASK)
    return value


def contains_secret(text: str, secrets: Iterable[str]) -> bool:
    """True if any form of any of ``secrets`` occurs in ``text``."""
    return any(form in text for form in _all_forms(tuple(s for s in secrets if s)))


def _all_forms(secrets: tuple[str, ...]) -> tuple[str, ...]:
    forms: set[str] = set()
    for secret in secrets:
        forms.update(secret_forms(secret))
    # Longest first, so that a form containing another is masked whole.
    return tuple(sorted(forms, key=lambda form: (-len(form), form)))


@lru_cache(maxsize=256)
def secret_forms(secret: str) -> frozenset[str]:
    """The strings a secret shows up as in error texts and responses, to be masked.

    The value itself; stripped of surrounding blanks; each line of a multi-line value;
    escaped as JSON, as a Python literal and with unicode escapes (``\\n``, ``\\r``,
    ``\\u00e9``); percent-encoded (URLs, forms); base64 (standard and URL-safe, at
    each of the three byte alignments, so also inside a longer encoded text such as a
    Basic auth header); and reversed. Forms shorter than ``MIN_FORM_LENGTH`` are left
    out.
    """
    variants = {secret, secret.strip()}
    variants.update(line.strip() for line in re.split(r"\r\n|\r|\n", secret))
    textual = set(variants)
    for text in textual:
        variants.add(json.dumps(text)[1:-1])
        variants.add(json.dumps(text, ensure_ascii=False)[1:-1])
        variants.add(repr(text)[1:-1])
        variants.add(text.encode("unicode_escape").decode("ascii"))
        quoted = quote(text, safe="")
        variants.update({quoted, quote(text), quote_plus(text), _lower_escapes(quoted)})
        variants.update(_base64_cores(text.encode("utf-8")))
        variants.add(text[::-1])
    return frozenset(v for v in variants if len(v) >= MIN_FORM_LENGTH)


def _lower_escapes(quoted: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quoted)


def _base64_cores(data: bytes) -> set[str]:
    """The base64 characters that encode ``data`` alone, whatever bytes surround it:
    for each alignment (0, 1 or 2 bytes before it), the encoding without the characters
    that mix in the neighbouring bytes."""
    cores: set[str] = set()
    for before in range(3):
        encoded = base64.b64encode(b"\0" * before + data).decode("ascii").rstrip("=")
        start = (0, 2, 3)[before]
        end = len(encoded) - (1 if (before + len(data)) % 3 else 0)
        core = encoded[start:end]
        cores.add(core)
        cores.add(core.translate(_URLSAFE))
        if before == 0:
            whole = base64.b64encode(data).decode("ascii")
            cores.update({whole, whole.translate(_URLSAFE)})
    return cores


_URLSAFE = str.maketrans("+/", "-_")


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
