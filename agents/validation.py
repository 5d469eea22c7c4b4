"""Checks of caller-supplied JSON, shared by every service that stores some."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from django.conf import settings

from agents_project.errors import InvalidInput


def json_value_check(value: Any, *, field: str) -> None:
    """Refuse, naming ``field``, a value the database cannot store as JSON or one larger
    than ``AGENTS_MAX_INPUT_BYTES``: not JSON (NaN, sets, objects), a NUL character
    (PostgreSQL's jsonb has none), or an unpaired surrogate (not valid UTF-8)."""
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"must be JSON: {exc}", field=field) from None
    if any("\x00" in text for text in _strings(value)):
        raise InvalidInput("must not contain NUL characters", field=field)
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("must be valid Unicode (an unpaired surrogate)", field=field) from None
    limit = settings.AGENTS["MAX_INPUT_BYTES"]
    if size > limit:
        raise InvalidInput(f"is larger than {limit} bytes", field=field)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
