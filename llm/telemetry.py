"""Model calls as OpenTelemetry spans, in the GenAI semantic conventions.

One ``chat {model}`` span (kind ``CLIENT``) per request a model actually receives,
from the worker (``llm.step``) or from the model gateway (``llm.gateway``), with
``gen_ai.operation.name``, ``gen_ai.provider.name`` (``openai``: the wire protocol
and SDK every model is reached with), ``gen_ai.request.model``, ``server.address`` and
``server.port``, then ``gen_ai.response.model``, ``gen_ai.response.id``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens`` and
``gen_ai.response.finish_reasons`` from the reply. A recorded reply a step reuses (its
first copy died after the model answered) gets a span of its own marked
``agents.model_call.reused`` with no usage, so that nothing summing spans counts it
twice.

Prompts and completions are on the span (``gen_ai.input.messages``,
``gen_ai.output.messages``) only with the conventions' opt-in
(``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``), and then masked like
the audit trail (``agents_project.redaction.redact``: secret-named keys, and the task's
credentials and the model's key in every form), tool-call arguments decoded first so
that their keys are masked too.

Everything here does nothing (and costs one test) when tracing is off.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from agents_project import tracing
from agents_project.redaction import redact
from llm.client import ChatReply
from tools.credentials import task_credentials

PROVIDER = "openai"
_NO_SPAN = contextlib.nullcontext()


def chat_span(
    *, model: str, base_url: str = "", key: str = "", parent: str | None = None
) -> contextlib.AbstractContextManager[Any]:
    """The span of one request to ``model`` (``parent``: a ``traceparent`` to start
    under, for the gateway); a null context when tracing is off."""
    if not tracing.ENABLED:
        return _NO_SPAN
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": model,
        "agents.model_call.key": key,
        "agents.model_call.reused": False,
    }
    if base_url:
        parts = urlsplit(base_url)
        attributes["server.address"] = parts.hostname or ""
        attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return tracing.span(f"chat {model}", kind="client", parent=parent, attributes=attributes)


def content_secrets(*, task_id: UUID, owner_id: int, api_key: str) -> tuple[str, ...]:
    """What content on a span must never show: the task's credentials and the model's
    key. Read only when content is captured (one query)."""
    values = [value for value, _ in task_credentials(task_id, owner_id).values()]
    return tuple(v for v in (*values, api_key) if v)


def chat_request_record(messages: Sequence[dict[str, Any]], *, secrets: Sequence[str] = ()) -> None:
    """Put the request's messages on the current span, when content is captured."""
    if tracing.capture_content():
        parts = [_message_parts(m) for m in messages]
        tracing.attributes_set({"gen_ai.input.messages": _masked_json(parts, secrets)})


def chat_reply_record(reply: ChatReply, *, model: str, secrets: Sequence[str] = ()) -> None:
    """Put a reply's model, usage and finish reason (and, when captured, its content)
    on the current span."""
    if not tracing.ENABLED:
        return
    response = reply.response
    attributes: dict[str, Any] = {
        "gen_ai.response.model": str(response.get("model") or model),
        "gen_ai.usage.input_tokens": reply.prompt_tokens,
        "gen_ai.usage.output_tokens": reply.completion_tokens,
        "gen_ai.response.finish_reasons": [reply.finish_reason or "unknown"],
    }
    if response.get("id"):
        attributes["gen_ai.response.id"] = str(response["id"])
    if tracing.capture_content():
        message = {"role": "assistant", "content": reply.content, "tool_calls": reply.tool_calls}
        output = {**_message_parts(message), "finish_reason": reply.finish_reason}
        attributes["gen_ai.output.messages"] = _masked_json([output], secrets)
    tracing.attributes_set(attributes)


def chat_reused(*, model: str, key: str, response_model: str, finish_reason: str) -> None:
    """A span for a recorded reply reused instead of a request: marked
    ``agents.model_call.reused``, without usage (the call was counted once, when made)."""
    if not tracing.ENABLED:
        return
    with chat_span(model=model, key=key):
        tracing.attributes_set(
            {
                "agents.model_call.reused": True,
                "gen_ai.response.model": response_model or model,
                "gen_ai.response.finish_reasons": [finish_reason or "unknown"],
            }
        )


def _message_parts(message: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions message in the conventions' shape: ``{role, parts}``."""
    role = str(message.get("role", ""))
    parts: list[dict[str, Any]] = []
    if role == "tool":
        parts.append(
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id", ""),
                "response": message.get("content", ""),
            }
        )
    elif message.get("content"):
        parts.append({"type": "text", "content": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function", {})
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id", ""),
                "name": function.get("name", ""),
                "arguments": _decoded(function.get("arguments", "")),
            }
        )
    return {"role": role, "parts": parts}


def _decoded(arguments: Any) -> Any:
    """Tool-call arguments as an object (so secret-named keys are masked), if JSON."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _masked_json(value: Any, secrets: Sequence[str]) -> str:
    return json.dumps(redact(value, secrets=secrets), ensure_ascii=False)
