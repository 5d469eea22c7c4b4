"""The audit trail as a readable timeline (the ``audit`` command and the demo)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from audit.models import AuditEvent, EventType

_WIDTH = 100


def describe(event: AuditEvent) -> str:
    """One short line saying what the event means."""
    p: dict[str, Any] = event.payload
    t = event.type
    if t == EventType.CREATED:
        child = f", child {p['spawn_index']} of {p['parent']}" if p.get("parent") else ""
        return f"{p.get('agent')} {p.get('version')} accepted{child}"
    if t == EventType.CHILDREN_STARTED:
        children = p.get("children") or []
        agents = sorted({str(c.get("agent")) for c in children})
        return f"started {len(children)} children ({', '.join(agents)}), join {p.get('join')}"
    if t == EventType.CHILD_ENDED:
        error = f": {_short(str(p['error']))}" if p.get("error") else ""
        return f"child {p.get('index')} {p.get('task')} ({p.get('agent')}) {p.get('status')}{error}"
    if t == EventType.TRANSITION:
        label = " (resumed)" if p.get("resumed") else ""
        reason = f"  [{p['reason']}]" if p.get("reason") else ""
        return f"{p.get('from')} -> {p.get('to')}{label}{reason}"
    if t == EventType.REASONING:
        return _short(p.get("text", ""))
    if t == EventType.TOOL_CALL:
        args = ", ".join(f"{k}={_compact(v)}" for k, v in p.get("args", {}).items())
        return f"{p.get('tool')}({args})"
    if t == EventType.TOOL_RESULT:
        if p.get("ok"):
            return f"{p.get('tool')} -> {_compact(p.get('value'))}"
        return f"{p.get('tool')} failed: {p.get('error')}"
    if t == EventType.STEP:
        return f"{p.get('outcome')} ({p.get('duration_ms')} ms)"
    if t == "model_call":  # written by the llm app (llm.step.MODEL_CALL)
        usage = p.get("usage") or {}
        reused = ", reused" if p.get("reused") else ""
        calls = [c.get("function", {}).get("name") for c in p.get("tool_calls") or ()]
        said = f"calls {', '.join(map(str, calls))}" if calls else _short(p.get("content", ""))
        return (
            f"{p.get('model')}: {usage.get('total_tokens')} tokens, {p.get('duration_ms')} ms"
            f"{reused}, {p.get('finish_reason')}: {said}"
        )
    if t == EventType.SUSPENDED:
        join = f"join {p['join']}" if "join" in p else None
        what = p.get("reason") or p.get("event") or p.get("wake_at") or join
        return f"waits for {p.get('kind')}: {_short(str(what))}"
    if t == EventType.APPROVAL_DECIDED:
        verdict = "approved" if p.get("approved") else "rejected"
        comment = f": {p['comment']}" if p.get("comment") else ""
        if p.get("decision") == "edit":
            changes = ", ".join(
                f"{c.get('op')} {c.get('path')}" + (f" = {c['value']!r}" if "value" in c else "")
                for c in p.get("diff") or ()
            )
            return f"edited by {event.actor} ({changes}){comment}"
        if p.get("decision") == "respond":
            return f"answered by {event.actor} instead of running {p.get('tool')}{comment}"
        return f"{verdict} by {event.actor}{comment}"
    if t == EventType.STEP_FAILED:
        retry = f", retry in {p['retry_in_seconds']} s" if "retry_in_seconds" in p else ""
        return f"attempt {p.get('attempt')}: {p.get('error_type')}: {p.get('error')}{retry}"
    if t == EventType.DEAD_LETTERED:
        return (
            f"{p.get('reason')} after {p.get('attempts')} attempt(s): {_short(str(p.get('error')))}"
        )
    if t == EventType.LEGAL_HOLD:
        verb = "legal hold placed" if p.get("held") else "legal hold released"
        return f"{verb} by {event.actor}" + (f": {p['reason']}" if p.get("reason") else "")
    if t == EventType.BREAKER:
        return f"breaker {p.get('breaker')}: {p.get('from')} -> {p.get('to')} ({p.get('reason')})"
    return _compact({k: v for k, v in p.items() if k != "traceback"})


def render(events: Iterable[AuditEvent]) -> str:
    lines = []
    for event in events:
        step = "" if event.step is None else f"step {event.step}"
        when = event.created_at.strftime("%H:%M:%S.%f")[:-3]
        line = f"{event.seq:>4}  {when}  {step:<8} {event.type:<16} {describe(event)}"
        lines.append(line)
    return "\n".join(lines)


def as_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "task": str(event.task_id),
        "seq": event.seq,
        "type": event.type,
        "step": event.step,
        "actor": event.actor,
        "created_at": event.created_at.isoformat(),
        "payload": event.payload,
    }


def _compact(value: Any) -> str:
    return _short(json.dumps(value, default=str, separators=(",", ":")), 60)


def _short(text: str, width: int = _WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
