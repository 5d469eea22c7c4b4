"""A task's audit trail as a live Server-Sent Events stream (``GET /api/tasks/{id}/events/``).

One SSE message per audit event, in order: ``id`` is the event's sequence number
(``AuditEvent.seq``, 1, 2, 3 ... with no gaps), ``event`` its type, ``data`` the same
JSON object as one entry of ``/api/tasks/{id}/audit/``. A client that loses the
connection reconnects with ``Last-Event-ID`` (browsers' ``EventSource`` does so by
itself) and gets exactly the events after that one: none lost, none repeated.

When the task has reached a final status and every event has been sent, the stream
ends with one ``end`` message (no ``id``, so it does not move the resumption point;
``data``: ``{"status": ..., "last_event_id": N}``) and the server closes it. A
reconnection after that gets ``204 No Content``, which tells ``EventSource`` to stop.
A dead-lettered task has not ended (an operator may requeue it): its stream stays open.

How new events are found: polling, by the (task, seq) unique index. Every
``AGENTS_EVENTS_POLL_INTERVAL`` seconds the stream reads the task row (status and
``audit_seq``, written in the same transaction as the events) and then the events
after the last one sent, up to that ``audit_seq``. That order is what makes "final
status and all events sent" exact. Chosen over PostgreSQL LISTEN/NOTIFY because it
needs nothing from the step engine (no NOTIFY in its transactions) and works on every
database the project supports; the price is up to one poll interval of latency and one
cheap indexed query per open stream per interval.

Serving: under ASGI (``uvicorn agents_project.asgi:application``, the image's web
command) the stream is an async generator and holds no thread between polls, only its
database connection. A sync WSGI process never holds a stream: there the response is
what the trail has now (in batches), then the stream closes and the client reconnects
after ``retry`` with ``Last-Event-ID``, so a worker is held for one read, never for the
task's life. Under ASGI a stream is closed by the server after ``AGENTS_EVENTS_MAX_SECONDS``
in all (absolute) or ``AGENTS_EVENTS_IDLE_SECONDS`` without a new event (idle), and the
client reconnects and resumes; a comment line is sent every ``AGENTS_EVENTS_HEARTBEAT``
seconds of silence (15), so that proxies keep the connection open and a server notices
a client that went away. How many may be open per user and in all: ``agents.api.streams``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from asgiref.sync import sync_to_async
from django.conf import settings

from agents.core.state_machine import FINAL
from agents.models import AgentTask
from audit.models import AuditEvent
from audit.timeline import describe

# Events read per query; a task with a long trail is sent in batches without waiting.
BATCH = 500
HEARTBEAT_SECONDS = 15.0  # unless AGENTS["EVENTS_HEARTBEAT"] says otherwise
# What EventSource waits before reconnecting (milliseconds), sent once per stream.
RECONNECT_MS = 2000


@dataclass(frozen=True)
class EventsRead:
    """One poll: the events after the cursor, and whether the stream is complete."""

    events: list[AuditEvent]
    status: str
    audit_seq: int

    @property
    def ended(self) -> bool:
        last = self.events[-1].seq if self.events else None
        return self.status in FINAL and (last is None or last >= self.audit_seq)


def task_events_read(*, task_id: UUID, after_seq: int, limit: int = BATCH) -> EventsRead:
    """The task's audit events after ``after_seq`` (at most ``limit``), with its status.

    Reads the task row first, then events up to its ``audit_seq``: both are written in
    one transaction, so when the status is final and the last event returned is
    ``audit_seq``, nothing more will ever come. Raises ``AgentTask.DoesNotExist``.
    """
    status, audit_seq = AgentTask.objects.values_list("status", "audit_seq").get(pk=task_id)
    events = list(
        AuditEvent.objects.filter(task_id=task_id, seq__gt=after_seq, seq__lte=audit_seq)
        .order_by("seq")
        .only("seq", "type", "step", "actor", "created_at", "payload")[:limit]
    )
    return EventsRead(events=events, status=status, audit_seq=audit_seq)


def task_events_finished(*, task_id: UUID, after_seq: int) -> bool:
    """True when the task has ended and ``after_seq`` is its last event: a stream
    from there would be empty (the view answers 204)."""
    status, audit_seq = AgentTask.objects.values_list("status", "audit_seq").get(pk=task_id)
    return status in FINAL and after_seq >= audit_seq


def event_data(event: AuditEvent) -> dict[str, Any]:
    """The JSON of one event: the shape of an ``/api/tasks/{id}/audit/`` entry."""
    return {
        "seq": event.seq,
        "type": event.type,
        "step": event.step,
        "actor": event.actor,
        "created_at": event.created_at.isoformat(),
        "payload": event.payload,
        "summary": describe(event),
    }


def sse_message(*, data: Any, event: str | None = None, id: int | None = None) -> bytes:
    """One SSE message. ``data`` is JSON on one line (json.dumps escapes newlines)."""
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return ("\n".join(lines) + "\n\n").encode()


def _event_message(event: AuditEvent) -> bytes:
    return sse_message(id=event.seq, event=event.type, data=event_data(event))


def _end_message(read: EventsRead) -> bytes:
    return sse_message(event="end", data={"status": read.status, "last_event_id": read.audit_seq})


class _Stream:
    """The stream's state between polls, shared by the sync and async generators."""

    def __init__(self, task_id: UUID, after_seq: int) -> None:
        conf = settings.AGENTS
        self.task_id = task_id
        self.last = after_seq
        self.interval = float(conf.get("EVENTS_POLL_INTERVAL", 0.5))
        self.until = time.monotonic() + float(conf.get("EVENTS_MAX_SECONDS", 900.0))
        self.idle = float(conf.get("EVENTS_IDLE_SECONDS", 300.0))
        self.quiet_since = self.last_event_at = time.monotonic()
        self.heartbeat = float(conf.get("EVENTS_HEARTBEAT", HEARTBEAT_SECONDS))

    def read(self) -> EventsRead:
        return task_events_read(task_id=self.task_id, after_seq=self.last)

    def messages(self, read: EventsRead) -> list[bytes]:
        out = [_event_message(event) for event in read.events]
        if read.events:
            self.last = read.events[-1].seq
            self.quiet_since = self.last_event_at = time.monotonic()
        if read.ended:
            out.append(_end_message(read))
        elif time.monotonic() - self.quiet_since >= self.heartbeat:
            out.append(b": keep-alive\n\n")
            self.quiet_since = time.monotonic()
        return out

    def wait(self, read: EventsRead) -> float | None:
        """Seconds to sleep before the next poll; None when the stream is over: the task
        ended, or the absolute or the idle timeout passed (the client resumes)."""
        now = time.monotonic()
        if read.ended or now >= self.until or now - self.last_event_at >= self.idle:
            return None
        return 0.0 if len(read.events) == BATCH else self.interval


def event_stream(*, task_id: UUID, after_seq: int) -> Iterator[bytes]:
    """The stream for a WSGI server: the events there are now, then it closes (the
    client reconnects after ``retry`` and resumes): it never waits for new ones, so it
    holds the request's thread for one read, not for the task's life."""
    stream = _Stream(task_id, after_seq)
    yield f"retry: {RECONNECT_MS}\n\n".encode()
    while True:
        read = stream.read()
        yield from stream.messages(read)
        if stream.wait(read) is None or len(read.events) < BATCH:
            return  # over, or nothing more to send without waiting


class LiveSource(Protocol):
    """Messages that are not audit events, relayed live between polls (the ``llm``
    app's ``model_delta``: ``llm.streaming.DeltaSubscription``)."""

    async def open(self) -> None: ...

    def messages(self, seconds: float) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


_LIVE_SOURCES: list[Callable[[UUID], LiveSource]] = []


def live_source_register(factory: Callable[[UUID], LiveSource]) -> None:
    """Relay ``factory(task_id)``'s messages in every ASGI event stream (an app above
    this one registers in its ``AppConfig.ready``). Its messages carry no ``id``: they
    do not move ``Last-Event-ID``, and a reconnection gets only those sent after it."""
    if factory not in _LIVE_SOURCES:
        _LIVE_SOURCES.append(factory)


async def event_stream_async(*, task_id: UUID, after_seq: int) -> AsyncIterator[bytes]:
    """The stream for an ASGI server: no thread held between polls. Each read runs in
    the request's own sync thread (Django's per-request ThreadSensitiveContext), which
    keeps one database connection for the stream and closes it when the stream ends or
    the client goes away (the generator is cancelled). Between polls it relays the
    live sources' messages (``live_source_register``)."""
    stream = _Stream(task_id, after_seq)
    read_async = sync_to_async(stream.read)
    live = [factory(task_id) for factory in _LIVE_SOURCES[:1]]
    try:
        for source in live:
            await source.open()
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        while True:
            read = await read_async()
            for message in stream.messages(read):
                yield message
            pause = stream.wait(read)
            if pause is None:
                return
            if not live:
                await asyncio.sleep(pause)
                continue
            async for message in live[0].messages(pause):
                stream.quiet_since = stream.last_event_at = time.monotonic()
                yield message
    finally:
        for source in live:
            await source.close()
