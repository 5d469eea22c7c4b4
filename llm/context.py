"""Context-window policies: which messages of a conversation go into a model request.

The full history always stays in storage (``llm.models.Message``) and in the audit
trail; a policy only chooses what the next request carries:

- ``full``: every message.
- ``rolling``: the system prompt, then the latest turns that fit within
  ``max_messages`` and ``max_tokens``. Turns are taken whole: an assistant message that
  calls tools and the tool results answering it are kept or dropped together, so the
  model never sees a tool call without its result, or a result without its call.
- ``summarize``: the system prompt, the original prompt, a summary of the older turns,
  and the turns since that summary. When those pass ``max_messages`` / ``max_tokens``,
  everything but the last ``keep_last`` messages (again never splitting a tool call
  from its results) is folded into a new summary by a model call. That call is recorded
  and billed like any other, made once, and reused by every later step until the next
  fold.
- ``select``: the system prompt, the original prompt, every message a step marked as
  pinned, and the turns of the current sub-task (within the limits, as ``rolling``).

Token counts: the provider's ``usage`` where it is known (budgets and bills use only
that); for messages not yet sent, :func:`estimate_tokens`: 4 tokens of overhead per
message plus one token per 4 characters of its content and of its tool calls' JSON,
rounded up. That is the usual rule of thumb for English text with the common BPE
tokenizers; it errs high for code and low for some other scripts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Policy = Literal["full", "rolling", "summarize", "select"]
POLICIES: tuple[str, ...] = ("full", "rolling", "summarize", "select")
MESSAGE_OVERHEAD = 4
CHARS_PER_TOKEN = 4
DEFAULT_MAX_MESSAGES = 20


@dataclass
class ChatMessage:
    """One message of a conversation, as stored and as sent."""

    role: str
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str = ""
    name: str = ""
    pinned: bool = False
    subtask: int = 0
    seq: int | None = None
    model_call_id: int | None = None

    @property
    def tokens(self) -> int:
        return estimate_tokens(self)

    def wire(self) -> dict[str, Any]:
        """The chat-completions form of this message."""
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = self.tool_calls
        if self.role == "tool":
            data["tool_call_id"] = self.tool_call_id
        return data


def estimate_tokens(message: ChatMessage) -> int:
    """Estimated tokens of ``message`` (see the module docstring for the rule)."""
    chars = len(message.content or "")
    if message.tool_calls:
        chars += len(json.dumps(message.tool_calls, separators=(",", ":")))
    return MESSAGE_OVERHEAD + math.ceil(chars / CHARS_PER_TOKEN)


def estimate_request_tokens(messages: Sequence[ChatMessage], tools: Sequence[Any] = ()) -> int:
    """Estimated prompt tokens of a request with ``messages`` and the ``tools`` schemas."""
    schema_chars = len(json.dumps(list(tools), separators=(",", ":"))) if tools else 0
    return sum(m.tokens for m in messages) + math.ceil(schema_chars / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class ContextSettings:
    """A task's ``context`` input. ``None`` limits are unlimited."""

    policy: Policy = "full"
    max_messages: int | None = None
    max_tokens: int | None = None
    keep_last: int = 6

    @classmethod
    def from_input(cls, data: dict[str, Any] | None) -> ContextSettings:
        """From a ``context`` input; a policy other than ``full`` given no limit keeps
        ``DEFAULT_MAX_MESSAGES`` messages."""
        data = data or {}
        policy = data.get("policy", "full")
        max_messages, max_tokens = data.get("max_messages"), data.get("max_tokens")
        if policy != "full" and max_messages is None and max_tokens is None:
            max_messages = DEFAULT_MAX_MESSAGES
        return cls(
            policy=policy,
            max_messages=max_messages,
            max_tokens=max_tokens,
            keep_last=data.get("keep_last", 6),
        )

    def over(self, messages: Sequence[ChatMessage]) -> bool:
        """Do ``messages`` pass either limit?"""
        if self.max_messages is not None and len(messages) > self.max_messages:
            return True
        return self.max_tokens is not None and sum(m.tokens for m in messages) > self.max_tokens

    def shrunk(self, request_tokens: int, request_messages: int) -> ContextSettings | None:
        """Tighter limits after the server refused a request of this size as too long:
        half of it. ``None`` when the policy cannot shrink a request (``full``)."""
        if self.policy == "full":
            return None
        tokens = max(request_tokens // 2, 1)
        messages = max(request_messages // 2, 1)
        return replace(
            self,
            max_tokens=min(self.max_tokens or tokens, tokens),
            max_messages=min(self.max_messages or messages, messages),
            keep_last=max(min(self.keep_last, messages // 2), 1),
        )


def turns(messages: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """``messages`` cut into turns: an assistant message together with the tool results
    answering its calls, or any other message alone. A tool result whose call is not in
    ``messages`` (the call was cut off) forms no turn and is dropped."""
    groups: list[list[ChatMessage]] = []
    open_calls: set[str] = set()
    for message in messages:
        if message.role == "tool":
            if message.tool_call_id in open_calls and groups:
                groups[-1].append(message)
                open_calls.discard(message.tool_call_id)
            continue
        open_calls = {c["id"] for c in message.tool_calls or ()}
        groups.append([message])
    return groups


def latest_turns(
    messages: Sequence[ChatMessage],
    *,
    max_messages: int | None,
    max_tokens: int | None,
    reserved_tokens: int = 0,
) -> list[ChatMessage]:
    """The latest whole turns of ``messages`` within the limits (``reserved_tokens``
    are already taken by what goes before them). The last turn is always kept, even if
    it alone passes a limit: there is nothing smaller to send."""
    kept: list[list[ChatMessage]] = []
    count, tokens = 0, reserved_tokens
    for group in reversed(turns(messages)):
        size, weight = len(group), sum(m.tokens for m in group)
        if kept and (
            (max_messages is not None and count + size > max_messages)
            or (max_tokens is not None and tokens + weight > max_tokens)
        ):
            break
        kept.append(group)
        count, tokens = count + size, tokens + weight
    return [m for group in reversed(kept) for m in group]


def fold_point(messages: Sequence[ChatMessage], keep_last: int) -> int:
    """How many of ``messages`` (from the start) a summary replaces, leaving at least
    ``keep_last`` messages and never splitting a turn. 0: nothing can be folded."""
    index = max(len(messages) - keep_last, 0)
    # Back up to the start of a turn: a tool result stays with the call it answers.
    while index > 0 and messages[index].role == "tool":
        index -= 1
    return index


@dataclass
class Plan:
    """What a policy decided: the messages to send and, for ``summarize``, the messages
    to fold into a new summary first (then ``summarize_upto`` is the seq after them)."""

    messages: list[ChatMessage]
    fold: list[ChatMessage] = field(default_factory=list)
    summarize_upto: int | None = None


SUMMARY_INSTRUCTION = (
    "Summarise the conversation below for your own later use: the task, the facts and "
    "numbers found, the tool results that matter, decisions made and what is left to do. "
    "Be complete and brief."
)


def summary_message(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=f"Summary of the earlier conversation:\n{text}")


def summary_request(previous: str | None, fold: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The messages of the model call that folds ``fold`` (after ``previous``, the
    summary it extends) into one summary."""
    lines = []
    if previous:
        lines.append(f"[earlier summary]\n{previous}")
    for m in fold:
        text = m.content
        if m.tool_calls:
            calls = ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})" for c in m.tool_calls
            )
            text = f"{text}\n[calls {calls}]".strip()
        lines.append(f"[{m.role}{' ' + m.name if m.name else ''}]\n{text}")
    return [
        ChatMessage(role="system", content=SUMMARY_INSTRUCTION),
        ChatMessage(role="user", content="\n\n".join(lines)),
    ]


def well_formed(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """``messages`` as a server accepts them: every tool result right after the call it
    answers, and every tool call answered. A result whose call was left out (``select``
    can keep a pinned result without its call) becomes a plain note from the user; a
    call whose results were left out is kept as text."""
    out: list[ChatMessage] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        if message.role == "tool":
            out.append(_as_note(message))
            index += 1
            continue
        if not message.tool_calls:
            out.append(message)
            index += 1
            continue
        ids = [c["id"] for c in message.tool_calls]
        results = list(messages[index + 1 : index + 1 + len(ids)])
        if [r.role for r in results] == ["tool"] * len(ids) and sorted(
            r.tool_call_id for r in results
        ) == sorted(ids):
            out.append(message)
            out.extend(results)
            index += 1 + len(ids)
            continue
        calls = ", ".join(c["function"]["name"] for c in message.tool_calls)
        text = f"{message.content}\n[called {calls}]".strip()
        out.append(replace(message, content=text, tool_calls=None))
        index += 1
    return out


def _as_note(message: ChatMessage) -> ChatMessage:
    label = f"[result of {message.name or 'a tool call'}]"
    return replace(message, role="user", content=f"{label}\n{message.content}", tool_call_id="")
