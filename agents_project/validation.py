"""Checks of caller-supplied JSON, shared by every service that stores some."""

from __future__ import annotations

import json
import re
from typing import Any

from django.conf import settings

from agents_project.errors import InvalidInput, PermanentError


def max_depth() -> int:
    """``AGENTS_MAX_JSON_DEPTH``: the deepest nesting of objects and arrays accepted."""
    return int(settings.AGENTS["MAX_JSON_DEPTH"])


def json_value_check(value: Any, *, field: str) -> None:
    """Refuse, naming ``field``, a value the database cannot store as JSON or one larger
    than ``AGENTS_MAX_INPUT_BYTES``: nested deeper than ``AGENTS_MAX_JSON_DEPTH``, not
    JSON (NaN, infinities, sets, objects), a NUL character (PostgreSQL's jsonb has none),
    or an unpaired surrogate (not valid UTF-8). Walks the value without recursion."""
    strings = _depth_check_and_strings(value, field=field)
    if any("\x00" in text for text in strings):
        raise InvalidInput("must not contain NUL characters", field=field)
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"must be JSON: {exc}", field=field) from None
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("must be valid Unicode (an unpaired surrogate)", field=field) from None
    limit = settings.AGENTS["MAX_INPUT_BYTES"]
    if size > limit:
        raise InvalidInput(f"is larger than {limit} bytes", field=field)


def _depth_check_and_strings(value: Any, *, field: str) -> list[str]:
    limit = max_depth()
    strings: list[str] = []
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict | list | tuple):
            if depth >= limit:
                raise InvalidInput(
                    f"is nested deeper than {limit} levels (AGENTS_MAX_JSON_DEPTH)", field=field
                )
            if isinstance(item, dict):
                strings.extend(k for k in item if isinstance(k, str))
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return strings


# A JSON text's tokens that matter for nesting: strings (skipped whole) and punctuation.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]', re.DOTALL)


def json_text_depth_check(text: str) -> None:
    """Refuse a JSON text nested deeper than ``AGENTS_MAX_JSON_DEPTH`` before parsing it
    (Python's parser would raise ``RecursionError`` on deep enough input), with an
    ``InvalidInput`` whose field is the path to where it gets too deep (``input.a[0]``).
    Scans the text once, without recursion; does not validate it otherwise."""
    limit = max_depth()
    # One entry per open container: [is_object, key or index, expecting a key].
    path: list[list[Any]] = []
    pending_key: str | None = None
    for match in _TOKENS.finditer(text):
        token = match.group()
        top = path[-1] if path else None
        if token in "[{":
            if len(path) >= limit:
                raise InvalidInput(
                    f"is nested deeper than {limit} levels (AGENTS_MAX_JSON_DEPTH)",
                    field=_render(path) or "body",
                )
            path.append([True, None, True] if token == "{" else [False, 0, False])
        elif token in "]}":
            if path:
                path.pop()
        elif token == ":":
            if top is not None and top[0]:
                top[1], top[2] = pending_key, False
        elif token == ",":
            if top is not None:
                if top[0]:
                    top[2] = True
                else:
                    top[1] += 1
        elif top is not None and top[0] and top[2]:
            try:
                pending_key = json.loads(token)
            except ValueError:
                pending_key = token[1:-1]


def _render(path: list[list[Any]]) -> str:
    text = "" if not path or path[0][0] else "body"
    for is_object, key, _ in path[:8]:
        if is_object:
            text += f".{key}" if text else str(key)
        else:
            text += f"[{key}]"
    return text + ("..." if len(path) > 8 else "")


def json_path_check(value: Any, *, path: str) -> None:
    """Refuse with ``PermanentError`` a value a step wants stored that PostgreSQL's jsonb
    would refuse inside the commit, naming where it is (``state.items[3]``,
    ``tool_results[0].value.name``): not JSON (NaN or infinity, a set, bytes, any other
    object, a key that is not a string), a NUL character, or an unpaired surrogate.
    Walks the value iteratively, so no depth makes it recurse."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if item is None or isinstance(item, bool | int):
            continue
        if isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise PermanentError(f"{where}: {item!r} is not a JSON number")
        elif isinstance(item, str):
            _text_check(item, where, PermanentError)
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, dict):
            for key, v in item.items():
                if not isinstance(key, str):
                    raise PermanentError(f"{where}: key {key!r} is not a string")
                _text_check(key, f"{where} (key {key[:40]!r})", PermanentError)
                stack.append((f"{where}.{key}", v))
        else:
            raise PermanentError(f"{where}: a {type(item).__name__} is not JSON")


def _text_check(text: str, where: str, error: type[Exception]) -> None:
    if "\x00" in text:
        raise error(f"{where}: contains a NUL character, which PostgreSQL cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: contains an unpaired surrogate (not valid Unicode)") from None


def json_storable(value: Any, *, depth: int = 0) -> Any:
    """A copy of ``value`` that PostgreSQL's jsonb stores, for recording what went
    wrong: NUL characters and unpaired surrogates replaced by U+FFFD, NaN and infinities
    by None, sets and tuples by lists, other objects by their ``repr``, keys made
    strings, and nesting below 64 levels cut to ``"..."``."""
    if depth > 64:
        return "..."
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {
            json_storable(str(k), depth=depth + 1): json_storable(v, depth=depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [json_storable(v, depth=depth + 1) for v in value]
    return json_storable(repr(value), depth=depth + 1)
