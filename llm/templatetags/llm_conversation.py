"""``{% conversation task %}``: an LLM task's conversation on its admin page."""

from __future__ import annotations

import json
from typing import Any

from django import template

from agents.models import AgentTask
from llm.models import Message
from llm.selectors import task_usage

register = template.Library()

SHOWN = 200


@register.inclusion_tag("llm/conversation.html")
def conversation(task: AgentTask) -> dict[str, Any]:
    """The latest ``SHOWN`` messages (role, content, tool calls and results; tokens and
    cost of the call that produced each reply) and the task's usage. Empty for a task
    without a conversation, so the page shows nothing for other agents."""
    total = Message.objects.filter(task=task).count()
    if not total:
        return {"messages": [], "total": 0}
    rows = list(
        Message.objects.filter(task=task).select_related("model_call").order_by("-seq")[:SHOWN]
    )[::-1]
    messages = [
        {
            "message": m,
            "calls": [
                (c["function"]["name"], c["function"]["arguments"], c["id"])
                for c in m.tool_calls or ()
            ],
            "call": m.model_call,
        }
        for m in rows
    ]
    return {
        "messages": messages,
        "total": total,
        "cut": total > SHOWN,
        "usage": task_usage(task_id=task.pk),
        "usage_json": json.dumps(task_usage(task_id=task.pk)),
    }
