"""The API's JSON parser: DRF's, with the nesting depth checked before parsing."""

from __future__ import annotations

import json
from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.settings import api_settings
from rest_framework.utils.json import strict_constant

from agents_project.validation import json_text_depth_check


class JSONParser(parsers.JSONParser):
    """Strict JSON (no NaN or Infinity) nested at most ``AGENTS_MAX_JSON_DEPTH`` levels.

    A deeper body is refused with a 400 naming the field where it gets too deep
    (``agents_project.validation.json_text_depth_check``) before Python's parser sees it, so no
    body can make it recurse until ``RecursionError``. The body is already bounded by
    ``DATA_UPLOAD_MAX_MEMORY_SIZE``.
    """

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        encoding = (parser_context or {}).get("encoding") or "utf-8"
        raw = stream.read() if stream is not None else b""
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        json_text_depth_check(text)
        try:
            return json.loads(
                text, parse_constant=strict_constant if api_settings.STRICT_JSON else None
            )
        except (ValueError, RecursionError) as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
