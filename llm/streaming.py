"""Token streaming: a reply's text as the model writes it, live, to whoever watches.

With ``"stream": true`` in an ``llm`` task's input (and the model's ``stream`` option
not false in ``AGENTS_LLM_MODELS``), the request is sent with ``stream: true`` and
``stream_options.include_usage`` (the chat-completions wire format's server-sent
chunks). ``ChunkAccumulator`` rebuilds the whole completion from the chunks, so what is
recorded (``ModelCall``, the ``model_call`` audit event) is exactly what a request
without streaming records; each piece of text is published as it arrives:

- to Redis pub/sub, channel ``<AGENTS_REDIS_KEY_PREFIX>:model-delta:<task id>``, one
  JSON message ``{"key", "step", "index", "delta"}`` per chunk (``index``: 0, 1, 2 ...
  within the call); ``GET /api/tasks/{id}/events/`` relays them as ``model_delta``
  events (``DeltaSubscription``). Pub/sub keeps nothing: deltas are not durable, the
  recorded reply is;
- or, when ``AGENTS_LLM_DELTAS_FILE`` is set (the demo, which has no Redis), appended
  to that file, one JSON line per delta with the task's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import redis
import redis.asyncio as aioredis
import structlog
from django.conf import settings

logger = structlog.get_logger(__name__)


def delta_channel(task_id: UUID | str) -> str:
    """The Redis pub/sub channel of a task's model deltas."""
    return f"{settings.REDIS_KEY_PREFIX}:model-delta:{task_id}"


class ChunkAccumulator:
    """Rebuilds a ``ChatCompletion`` (as a dict) from the chunks of a streamed reply:
    content and refusal concatenated, tool calls merged by ``index`` (id, name and the
    argument text in pieces), the last ``finish_reason``, ``usage`` from the final
    chunk (``stream_options.include_usage``). ``feed`` returns the chunk's new text."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = 0
        self.content: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: Any) -> str:
        self.id = self.id or getattr(chunk, "id", "") or ""
        self.model = self.model or getattr(chunk, "model", "") or ""
        self.created = self.created or getattr(chunk, "created", 0) or 0
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage.model_dump(mode="json", exclude_none=True)
        text = ""
        for choice in getattr(chunk, "choices", None) or ():
            delta = choice.delta
            if delta is not None and delta.content:
                text += delta.content
            for call in (delta.tool_calls if delta is not None else None) or ():
                entry = self.tool_calls.setdefault(
                    call.index,
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                entry["id"] = call.id or entry["id"]
                if call.function is not None:
                    entry["function"]["name"] += call.function.name or ""
                    entry["function"]["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        if text:
            self.content.append(text)
        return text

    def completion(self) -> dict[str, Any]:
        """The reply as a non-streamed ``chat.completion`` object (JSON)."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        completion: dict[str, Any] = {
            "id": self.id or "chatcmpl-streamed",
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": self.finish_reason or "stop"}
            ],
        }
        if self.usage is not None:
            completion["usage"] = self.usage
        return completion


def delta_payload(*, key: str, step: int, index: int, delta: str) -> str:
    """One delta message (JSON text)."""
    return json.dumps({"key": key, "step": step, "index": index, "delta": delta})


def delta_publish(*, task_id: UUID, message: str) -> None:
    """Publish one delta (sync): to ``AGENTS_LLM_DELTAS_FILE`` when set, else to Redis.
    Never raises: a delta that cannot be sent is only a live view lost."""
    try:
        if settings.LLM.get("DELTAS_FILE"):
            with open(settings.LLM["DELTAS_FILE"], "a", encoding="utf-8") as out:
                out.write(json.dumps({"task_id": str(task_id), **json.loads(message)}) + "\n")
        elif settings.REDIS_URL:
            _client(settings.REDIS_URL).publish(delta_channel(task_id), message)
    except (redis.RedisError, OSError) as exc:
        logger.warning("model delta not published", error=repr(exc))


_clients: dict[str, redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(url)
    return client


class DeltaSubscription:
    """The live ``model_delta`` source of a task's event stream (``agents.events``):
    a Redis pub/sub subscription, opened when the stream starts."""

    def __init__(self, task_id: UUID) -> None:
        self.task_id = task_id
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None

    async def open(self) -> None:
        if not settings.REDIS_URL:
            return
        try:
            self._redis = aioredis.Redis.from_url(settings.REDIS_URL)
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(delta_channel(self.task_id))
        except redis.RedisError as exc:
            logger.warning("model deltas unavailable", error=repr(exc))
            await self.close()

    async def messages(self, seconds: float) -> AsyncIterator[bytes]:
        """SSE ``model_delta`` messages that arrive within ``seconds`` (no ``id``: they
        do not move the stream's resumption point)."""
        from agents.events import sse_message

        if self._pubsub is None:
            await asyncio.sleep(seconds)
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while (left := until - loop.time()) > 0:
            try:
                found = await self._pubsub.get_message(timeout=left)
            except redis.RedisError as exc:
                logger.warning("model deltas lost", error=repr(exc))
                await self.close()
                await asyncio.sleep(max(until - loop.time(), 0))
                return
            if found and found.get("type") == "message":
                data = json.loads(found["data"])
                yield sse_message(event="model_delta", data=data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            if self._redis is not None:
                await self._redis.aclose()
        self._pubsub = self._redis = None
