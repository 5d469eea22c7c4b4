"""The HTTP side of ``GET /api/tasks/{id}/events/`` (the stream itself: ``agents.events``):
the ``text/event-stream`` renderer DRF's content negotiation needs, and reading where a
client resumes from."""

from __future__ import annotations

import json
import re
from typing import Any

from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

from agents.api.serializers import MAX_INT
from agents_project.errors import InvalidInput

_DIGITS = re.compile(r"[0-9]{1,12}")

EVENTS_DESCRIPTION = """\
One Server-Sent Event per audit event, in order: `id` is the event's sequence number,
`event` its type, `data` the event as JSON (the shape of an `/audit/` entry). To resume
after a disconnection, send `Last-Event-ID: SEQ` (EventSource does it by itself) or
`?last_event_id=SEQ`: the stream continues with the next event, none lost or repeated.
Once the task has ended and every event was sent, an `end` event (no `id`) closes the
stream; asking again from the last event then answers 204, which stops EventSource.
"""


class EventStreamRenderer(BaseRenderer):
    """Lets a client that accepts only ``text/event-stream`` (EventSource) reach the
    view; errors before the stream starts are sent as one ``error`` event."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: dict[str, Any] | None = None,
    ) -> bytes:
        return f"event: error\ndata: {json.dumps(data, default=str)}\n\n".encode()


def last_event_id(request: Request) -> int:
    """Where the client resumes: the ``Last-Event-ID`` header, else the
    ``last_event_id`` query parameter, else 0 (from the start). The header wins: an
    EventSource reconnecting keeps its original URL and sends the newer id in the header.
    Raises ``InvalidInput`` naming the one at fault if it is not a sequence number."""
    header = request.headers.get("Last-Event-ID")
    if header is not None and header.strip() != "":
        return _seq(header, "Last-Event-ID")
    query = request.query_params.get("last_event_id")
    if query is not None:
        return _seq(query, "last_event_id")
    return 0


def _seq(value: str, field: str) -> int:
    text = value.strip()
    if not _DIGITS.fullmatch(text) or int(text) > MAX_INT:
        raise InvalidInput("must be an event sequence number (0 or more)", field=field)
    return int(text)
