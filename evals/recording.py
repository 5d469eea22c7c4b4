"""Recorded model replies: the seam between an evaluation run and the model.

A recording is a JSON file::

    {"format": 1, "responses": {"CASE|STEP|PURPOSE|HASH": {"model": ..., "reply": {...}}}}

keyed by the case id, the step, the call's purpose (``model``, ``model:2``,
``summary``) and a hash of the request (model, messages, tools; the task's id, which
differs on every run, replaced by ``<task>``). ``--live`` sends each request to the
configured model and records the reply under its key; ``--replay`` answers from the
recording only, without any network, rate limit or breaker, so a run is deterministic
and free. A request the recording does not hold (the prompt, the model or a tool result
changed) fails the step permanently, naming the case and step: record it with
``--live``. Because the hash covers the whole request, a changed prompt can never be
answered with a reply recorded for another one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agents.errors import PermanentError
from llm.client import ChatReply, ChatRequest

FORMAT = 1


class MissingRecording(PermanentError):
    """Replay found no recorded reply for a request."""


def request_hash(request: ChatRequest, task_id: str) -> str:
    """sha256 (hex, first 16) of the request's model, messages and tools, as canonical
    JSON, with ``task_id`` replaced by ``<task>``."""
    body = json.dumps(
        {"model": request.config.name, "messages": request.messages, "tools": request.tools},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    if task_id:
        body = body.replace(task_id, "<task>")
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class Recording:
    """The replies of one recording file, and the transport (``llm.client.chat_transport``)
    that replays (``live`` False) or records them. ``case`` is set by the runner to the
    id of the case running."""

    def __init__(self, path: Path | None, *, live: bool) -> None:
        self.path = path
        self.live = live
        self.case = ""
        self.responses: dict[str, Any] = {}
        self.recorded = 0
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"{path}: not a recording (format {FORMAT})")
            self.responses = dict(data.get("responses") or {})

    def key(self, request: ChatRequest) -> tuple[str, str]:
        task, _, rest = request.call.partition(":")
        step, _, purpose = rest.partition(":")
        return f"{self.case}|{step}|{purpose}|{request_hash(request, task)}", step

    def __call__(self, request: ChatRequest, send: Any) -> ChatReply:
        key, step = self.key(request)
        if not self.live:
            entry = self.responses.get(key)
            if entry is None:
                raise MissingRecording(
                    f"no recorded reply for case {self.case!r} step {step} (request "
                    f"{key.rsplit('|', 1)[-1]}): the request differs from every recorded "
                    "one; record it with --live"
                )
            return ChatReply(**entry["reply"])
        reply: ChatReply = send()
        self.responses[key] = {"model": request.config.name, "reply": asdict(reply)}
        self.recorded += 1
        return reply

    def save(self) -> None:
        """Write the file (``live`` only), keys sorted so a diff shows what changed."""
        if self.path is None or not self.live:
            return
        data = {"format": FORMAT, "responses": dict(sorted(self.responses.items()))}
        self.path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    def models(self) -> set[str]:
        return {entry.get("model", "") for entry in self.responses.values()} - {""}
