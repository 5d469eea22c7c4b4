"""Reading the LLM layer: a task's usage, its conversation, an owner's tokens today."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from agents_project.reads import Select
from llm.client import ChatReply, tool_call_ids
from llm.context import ChatMessage
from llm.models import Message, ModelCall

TAIL_PAGE = 100


def task_usage(*, task_id: UUID) -> dict[str, Any]:
    """``{model_calls, prompt_tokens, completion_tokens, total_tokens, cost}`` of every
    model call the task made (a reused response counts once: it is one row)."""
    return tasks_usage(task_ids=[task_id])


def tasks_usage(*, task_ids: Sequence[UUID]) -> dict[str, Any]:
    """``task_usage`` summed over the tasks ``task_ids``."""
    totals = ModelCall.objects.filter(task_id__in=task_ids).aggregate(
        model_calls=Count("pk"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
        total_tokens=Sum("total_tokens"),
        cost=Sum("cost"),
    )
    return {
        "model_calls": totals["model_calls"] or 0,
        "prompt_tokens": totals["prompt_tokens"] or 0,
        "completion_tokens": totals["completion_tokens"] or 0,
        "total_tokens": totals["total_tokens"] or 0,
        "cost": float(totals["cost"] or Decimal(0)),
    }


def owner_tokens_today(*, owner_id: int) -> int:
    """Tokens the owner's tasks used since midnight UTC (provider usage, else estimates)."""
    midnight = datetime.combine(timezone.now().date(), time.min, tzinfo=UTC)
    used = ModelCall.objects.filter(owner_id=owner_id, created_at__gte=midnight).aggregate(
        total=Sum("total_tokens")
    )["total"]
    return used or 0


def model_call_find(*, key: str) -> ModelCall | None:
    """The call recorded under ``key`` (unique), or None."""
    return _CALL_BY_KEY.first([key])


# Read for every model call, by the step and by the gateway (agents_project.reads).
_CALL_BY_KEY = Select(ModelCall, "key = %s", params=("key",), tail="LIMIT 1")
_CONVERSATION = Select(
    Message,
    "task_id = %s AND seq >= %s AND seq < %s",
    params=("task", "seq", "seq"),
    tail="ORDER BY seq",
)


def task_messages(*, task_id: UUID, after_seq: int | None = None) -> QuerySet[Message]:
    """The task's conversation in order, from the message after ``after_seq`` if given."""
    messages = Message.objects.filter(task_id=task_id).select_related("model_call")
    if after_seq is not None:
        messages = messages.filter(seq__gt=after_seq)
    return messages.order_by("seq")


def as_chat(message: Message) -> ChatMessage:
    return ChatMessage(
        role=message.role,
        content=message.content,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
        name=message.name,
        pinned=message.pinned,
        subtask=message.subtask,
        seq=message.seq,
        model_call_id=message.model_call_id,
    )


def conversation(
    *, task_id: UUID, start: int = 0, end: int, subtask: int | None = None
) -> list[ChatMessage]:
    """Messages ``start <= seq < end`` in order (of one sub-task, if given)."""
    if subtask is None:
        return [as_chat(m) for m in _CONVERSATION.all([task_id, start, end])]
    rows = Message.objects.filter(task_id=task_id, seq__gte=start, seq__lt=end)
    return [as_chat(m) for m in rows.filter(subtask=subtask).order_by("seq")]


def conversation_pinned(*, task_id: UUID, start: int, end: int) -> list[ChatMessage]:
    rows = Message.objects.filter(task_id=task_id, seq__gte=start, seq__lt=end, pinned=True)
    return [as_chat(m) for m in rows.order_by("seq")]


def conversation_tail(
    *,
    task_id: UUID,
    start: int,
    end: int,
    max_messages: int | None,
    max_tokens: int | None,
    subtask: int | None = None,
) -> list[ChatMessage]:
    """The latest messages before ``end`` (not before ``start``) until one more would
    pass a limit, plus one turn's worth beyond it; read a page at a time from the end,
    so a long conversation costs only its tail."""
    found: list[ChatMessage] = []
    tokens = 0
    for message in _backwards(task_id, start, end, subtask):
        found.append(message)
        tokens += message.tokens
        over_count = max_messages is not None and len(found) > max_messages
        over_tokens = max_tokens is not None and tokens > max_tokens
        # Stop at the start of a turn once past a limit: the policy cuts whole turns.
        if (over_count or over_tokens) and message.role != "tool":
            break
    found.reverse()
    return found


def _backwards(task_id: UUID, start: int, end: int, subtask: int | None) -> Iterator[ChatMessage]:
    cursor = end
    while cursor > start:
        filters = Q(task_id=task_id, seq__gte=start, seq__lt=cursor)
        if subtask is not None:
            filters &= Q(subtask=subtask)
        page = list(Message.objects.filter(filters).order_by("-seq")[:TAIL_PAGE])
        if not page:
            return
        for row in page:
            yield as_chat(row)
        cursor = page[-1].seq


def reply_from_record(record: ModelCall) -> ChatReply:
    """The reply as recorded: what every copy of the step acts on. Tool call ids are
    set as ``model_call_record`` sets them, also for a record made before it did."""
    response = tool_call_ids(record.response, record.step)
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    calls = [
        {
            "id": c["id"],
            "type": "function",
            "function": {
                "name": c["function"]["name"],
                "arguments": c["function"].get("arguments") or "{}",
            },
        }
        for c in message.get("tool_calls") or ()
        if c.get("function")
    ]
    return ChatReply(
        response=response,
        content=message.get("content") or "",
        tool_calls=calls,
        finish_reason=record.finish_reason,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        total_tokens=record.total_tokens,
        usage_estimated=record.usage_estimated,
        duration_ms=record.duration_ms,
    )
