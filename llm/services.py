"""Writing the LLM layer: a model call's record, a step's new messages."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from django.db import IntegrityError, connection, transaction

from agents.errors import PermanentError
from llm.client import ChatReply, ModelConfig, tool_call_ids
from llm.context import ChatMessage
from llm.models import Message, ModelCall
from tools.credentials import task_credentials


def model_call_record(
    *,
    task_id: UUID,
    owner_id: int,
    step: int,
    key: str,
    purpose: str,
    config: ModelConfig,
    reply: ChatReply,
) -> tuple[ModelCall, bool]:
    """Store ``reply`` under ``key`` in its own short transaction, at once.

    Returns ``(record, created)``. If another copy of the step recorded this key first,
    that record is returned (``created`` False) and this reply is discarded: every
    copy then acts on the same response. Tool calls without an id (or with a repeated
    one) are given ``call_<step>_<index>`` here, once (``llm.client.tool_call_ids``):
    the record, the assistant message and the tool results all carry that id.
    """
    try:
        with transaction.atomic():
            record = ModelCall.objects.create(
                task_id=task_id,
                owner_id=owner_id,
                step=step,
                key=key,
                purpose=purpose,
                model=config.name,
                endpoint=config.base_url,
                response=tool_call_ids(reply.response, step),
                finish_reason=reply.finish_reason,
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=reply.completion_tokens,
                total_tokens=reply.total_tokens,
                usage_estimated=reply.usage_estimated,
                cost=config.cost(reply.prompt_tokens, reply.completion_tokens),
                duration_ms=reply.duration_ms,
            )
    except IntegrityError:
        return ModelCall.objects.get(key=key), False
    return record, True


def message_tool_call_edit(*, task_id: UUID, call_id: str, args: dict[str, Any]) -> int:
    """Set the arguments of the tool call ``call_id`` in the task's assistant message
    that made it to ``args`` (a person's edit, ``agents.approvals``), so every later
    request shows the model the call that ran. Safe to run again (it sets, not adds).
    Returns how many messages changed (0 or 1)."""
    with transaction.atomic():
        # Newest first: the call awaiting approval is in one of the last replies. (No
        # JSON containment lookup: the zero-setup demo runs on SQLite.)
        rows = (
            Message.objects.select_for_update()
            .filter(task_id=task_id, role=Message.Role.ASSISTANT, tool_calls__isnull=False)
            .order_by("-seq")
        )
        for message in rows.iterator():
            calls = message.tool_calls or []
            if any(call.get("id") == call_id for call in calls):
                for call in calls:
                    if call.get("id") == call_id:
                        call["function"]["arguments"] = json.dumps(args)
                message.save(update_fields=("tool_calls",))
                return 1
    return 0


def messages_append(
    *, task_id: UUID, step: int, first_seq: int, messages: Sequence[ChatMessage]
) -> None:
    """Store a step's new messages as ``first_seq, first_seq + 1, ...``.

    Safe to run again: a step that runs twice adds the same messages under the same
    numbers (its model response is the recorded one), and rows already there are kept.
    """
    if not messages:
        return
    rows = [
        Message(
            task_id=task_id,
            seq=first_seq + offset,
            step=step,
            role=m.role,
            content=m.content,
            tool_calls=m.tool_calls,
            tool_call_id=m.tool_call_id,
            name=m.name,
            pinned=m.pinned,
            subtask=m.subtask,
            tokens=m.tokens,
            model_call_id=m.model_call_id,
        )
        for offset, m in enumerate(messages)
    ]
    if connection.vendor == "postgresql":
        _insert_new(rows)
    else:
        Message.objects.bulk_create(rows, ignore_conflicts=True)


def _insert_new(rows: list[Message]) -> None:
    """``rows`` in one ``INSERT ... ON CONFLICT DO NOTHING`` statement, with no
    transaction around it (Django's ``bulk_create`` opens one: two more round trips for
    each of a step's writes). Each value is prepared by its field, as ``bulk_create``
    prepares it."""
    fields = [f for f in Message._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    row = f"({', '.join(['%s'] * len(fields))})"
    params = [
        f.get_db_prep_save(getattr(message, f.attname), connection)
        for message in rows
        for f in fields
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Message._meta.db_table} ({columns}) VALUES"
            f" {', '.join([row] * len(rows))} ON CONFLICT (task_id, seq) DO NOTHING",
            params,
        )


def model_api_key(*, config: ModelConfig, task_id: UUID, owner_id: int) -> str:
    """The key of the model's requests for this task: the owner's credential when the
    model names one (never the deployment's key), sent only to a host it is bound to
    (``credentials set --host``; ``--any-host``: any); else ``AGENTS_LLM_API_KEY``.
    ``PermanentError`` when the owner has no such credential or it is bound to other
    hosts, or to none."""
    name = config.api_key_credential
    if not name:
        return config.api_key
    key, bound = task_credentials(task_id, owner_id).get(name, ("", ()))
    if not key:
        raise PermanentError(
            f"model {config.name!r} needs the credential {name!r}, "
            "which this task's owner does not have"
        )
    host = (urlsplit(config.base_url).hostname or "").lower().rstrip(".")
    if not bound:  # stored before hosts were required (check --deploy lists these)
        raise PermanentError(
            f"model {config.name!r}: credential {name!r} is bound to no host: set it "
            "again with 'credentials set --host HOST' (or --any-host)"
        )
    if not any(fnmatch.fnmatchcase(host, pattern) for pattern in bound):
        raise PermanentError(
            f"model {config.name!r}: credential {name!r} may only be sent to "
            f"{', '.join(bound)}, not to {host}"
        )
    return key
