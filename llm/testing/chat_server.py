"""A scripted chat-completions server on loopback: the stand-in for a language model.

It speaks the OpenAI wire format (``POST /v1/chat/completions``, ``GET /v1/models``) so
the real ``openai`` SDK talks to it over real HTTP, from any process. The tests and the
demo (``bin/demo --llm``) use it; it is never used against a real model.

A script is a list of entries; each request of a task (``X-Agents-Call`` header, which
the runtime sends as ``task id : step : purpose``) takes the task's next entry, and the
last entry repeats once the script runs out. ``scripts`` chooses a script by a text
the request's first user message contains; ``script`` is the default. Entries::

    {"content": "the answer"}                                  a final answer
    {"tool_calls": [{"name": "calc", "arguments": {...}}]}     tool calls (and content?);
                                                               a call's "id" is sent as
                                                               given ("" as llama.cpp
                                                               does; None: no id at all)
    {"status": 429, "retry_after": 1}                          an error status, with a
                                                               Retry-After header if given
    {"status": 400, "code": "context_length_exceeded"}         a refusal with that code
    {"delay": 2.5, ...}                                        answer that much later
    {"chunk_delay": 0.1, ...}                                 when streamed ("stream": true in
                                                               the request), this long between
                                                               pieces of about two words
    {"until_in_flight": 6, ...}                                answer once 6 requests are in
                                                               flight at once (30 s at most)
    {"hang": true}                                             never answer; note when the
                                                               client closes the connection
    {"malformed": true}                                        200 with broken JSON
    {"usage": false}                                           no usage in the answer
    {"summary": true}                                          summarise (echo the input's
                                                               length; used for summary calls)

``context_limit`` (tokens, estimated as characters / 4): a longer request is refused
with 400 ``context_length_exceeded`` without taking an entry. A summary request (the
runtime's ``:summary`` calls) never takes an entry either: it gets a short summary.

Every request is kept (``requests``) with its body, so tests can count requests per
task and step and look at what was sent; ``in_flight_max`` is the most requests it held
at once, ``disconnected`` the calls whose client hung up on a ``hang`` entry.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Entry = dict[str, Any]


@dataclass
class Recorded:
    """One request the server received."""

    call: str  # the X-Agents-Call header ("" without one)
    body: dict[str, Any]
    received_at: float
    authorization: str = ""  # the Authorization header: which key the request used

    @property
    def task(self) -> str:
        return self.call.split(":")[0] if self.call else ""

    @property
    def step(self) -> int | None:
        parts = self.call.split(":")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    @property
    def purpose(self) -> str:
        parts = self.call.split(":")
        return parts[2] if len(parts) > 2 else ""


@dataclass
class ChatServer:
    script: list[Entry] = field(default_factory=lambda: [{"content": "done"}])
    scripts: dict[str, list[Entry]] = field(default_factory=dict)
    # A function of the request body returning an entry, instead of a script.
    responder: Callable[[dict[str, Any]], Entry] | None = None
    context_limit: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    in_flight: int = 0
    in_flight_max: int = 0
    # Seconds between the pieces of a streamed answer (an entry's "chunk_delay" wins).
    chunk_delay: float = 0.02

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cursors: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None
        self._url = ""

    # --- running it -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL for the SDK (``AGENTS_LLM_BASE_URL``); kept after ``stop``."""
        assert self._url, "start the server first"
        return self._url

    def start(self) -> ChatServer:
        server = self

        class Handler(_Handler):
            chat = server

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._url = f"http://{self.host}:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @contextmanager
    def running(self) -> Iterator[ChatServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # --- what it saw ------------------------------------------------------------------------

    def received(
        self, *, task: str | None = None, step: int | None = None, purpose: str | None = None
    ) -> list[Recorded]:
        with self._lock:
            found = list(self.requests)
        return [
            r
            for r in found
            if (task is None or r.task == str(task))
            and (step is None or r.step == step)
            and (purpose is None or r.purpose == purpose)
        ]

    def count(self, **filters: Any) -> int:
        return len(self.received(**filters))

    # --- answering ----------------------------------------------------------------------------

    def answer(
        self,
        call: str,
        body: dict[str, Any],
        authorization: str = "",
        closed: Callable[[], bool] = lambda: False,
    ) -> tuple[int, dict[str, str], bytes | _Chunks]:
        with self._lock:
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            return self._answer(call, body, authorization, closed)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(
        self, call: str, body: dict[str, Any], authorization: str, closed: Callable[[], bool]
    ) -> tuple[int, dict[str, str], bytes | _Chunks]:
        record = Recorded(
            call=call, body=body, received_at=time.time(), authorization=authorization
        )
        with self._lock:
            self.requests.append(record)
        size = estimate(body)
        if self.context_limit is not None and size > self.context_limit:
            return _error(
                400,
                "context_length_exceeded",
                f"maximum context length is "
                f"{self.context_limit} tokens; the request has about {size}",
            )
        if record.purpose.startswith("summary"):
            entry: Entry = {"summary": True}
        elif self.responder is not None:
            entry = self.responder(body)
        else:
            entry = self._next(record.task or "anonymous", body)
        if entry.get("delay"):
            time.sleep(float(entry["delay"]))
        if entry.get("until_in_flight"):
            # Hold the answer until that many requests are in flight at once (30 s at
            # most): a test of concurrency that counts, never times.
            until = time.monotonic() + 30
            while self.in_flight < int(entry["until_in_flight"]) and time.monotonic() < until:
                time.sleep(0.02)
        if entry.get("hang"):
            while not closed():
                time.sleep(0.05)
            with self._lock:
                self.disconnected.append(call)
            return 499, {}, b""
        status = int(entry.get("status", 200))
        if status != 200:
            code, headers, payload = _error(
                status, entry.get("code", "scripted_error"), entry.get("message", "scripted")
            )
            if "retry_after" in entry:
                headers["Retry-After"] = str(entry["retry_after"])
            return code, headers, payload
        if entry.get("malformed"):
            return 200, {"Content-Type": "application/json"}, b'{"id": "chatcmpl-broken", "choi'
        whole = completion(body, entry, size, index=len(self.requests))
        if body.get("stream"):
            pause = float(entry.get("chunk_delay", self.chunk_delay))
            return 200, {"Content-Type": "text/event-stream"}, _Chunks(whole, body, pause)
        return 200, {"Content-Type": "application/json"}, json.dumps(whole).encode()

    def _next(self, task: str, body: dict[str, Any]) -> Entry:
        prompt = first_user_text(body)
        script = next((s for key, s in self.scripts.items() if key in prompt), self.script)
        key = f"{task}|{id(script)}"
        with self._lock:
            cursor = self._cursors.get(key, 0)
            self._cursors[key] = cursor + 1
        return script[min(cursor, len(script) - 1)]


def estimate(body: dict[str, Any]) -> int:
    """Tokens of a request as this server counts them: characters of its messages and
    tools, as JSON, divided by 4."""
    text = json.dumps(body.get("messages", [])) + json.dumps(body.get("tools", []))
    return len(text) // 4


def first_user_text(body: dict[str, Any]) -> str:
    for message in body.get("messages", []):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def completion(body: dict[str, Any], entry: Entry, prompt_tokens: int, *, index: int) -> dict:
    """A chat.completion object for ``entry``."""
    content: str | None = entry.get("content")
    calls = []
    for number, call in enumerate(entry.get("tool_calls") or ()):
        wire: dict[str, Any] = {
            "id": call.get("id", f"call_{index}_{number}"),
            "type": "function",
            "function": {
                "name": re.sub(r"[^A-Za-z0-9_-]", "_", call["name"]),
                "arguments": json.dumps(call.get("arguments", {})),
            },
        }
        if wire["id"] is None:
            del wire["id"]
        calls.append(wire)
    if entry.get("summary"):
        content = f"(summary of {len(json.dumps(body.get('messages', [])))} characters)"
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    completion_tokens = len(content or "") // 4 + 10 * len(calls) + 1
    data: dict[str, Any] = {
        "id": f"chatcmpl-{index}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if calls else "stop",
            }
        ],
    }
    usage = entry.get("usage", True)
    if usage is True:
        data["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    elif isinstance(usage, dict):
        data["usage"] = usage
    return data


class _Chunks:
    """A streamed answer (``"stream": true``): ``whole``'s text in pieces of about two
    words, ``pause`` seconds apart, its tool calls in one chunk, then the finish reason,
    the usage (when ``stream_options.include_usage``) and ``[DONE]``, as server-sent
    events of ``chat.completion.chunk`` objects."""

    def __init__(self, whole: dict[str, Any], body: dict[str, Any], pause: float) -> None:
        self.whole, self.body, self.pause = whole, body, pause

    def events(self) -> Iterator[bytes]:
        head = {k: self.whole[k] for k in ("id", "created", "model")}
        choice = self.whole["choices"][0]
        message = choice["message"]

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        words = re.findall(r"\S+\s*", message.get("content") or "")
        for start in range(0, len(words), 2):
            time.sleep(self.pause)
            yield chunk({"content": "".join(words[start : start + 2])})
        calls = [{**call, "index": i} for i, call in enumerate(message.get("tool_calls") or ())]
        if calls:
            yield chunk({"tool_calls": calls})
        yield chunk({}, choice["finish_reason"])
        options = self.body.get("stream_options") or {}
        if options.get("include_usage") and "usage" in self.whole:
            data = {**head, "object": "chat.completion.chunk", "choices": [],
                    "usage": self.whole["usage"]}  # fmt: skip
            yield f"data: {json.dumps(data)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    payload = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    chat: ChatServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(*_error(404, "not_found", f"no route {self.path}"))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(*_error(400, "invalid_json", "the request body is not JSON"))
            return
        answer = self.chat.answer(
            self.headers.get("X-Agents-Call", ""),
            body,
            self.headers.get("Authorization", ""),
            self._closed,
        )
        if answer[0] != 499:
            self._send(*answer)

    def _closed(self) -> bool:
        """Whether the client closed its end (a read would return nothing)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            models = {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(models).encode())
            return
        self._send(*_error(404, "not_found", f"no route {self.path}"))

    def _send(self, status: int, headers: dict[str, str], payload: bytes | _Chunks) -> None:
        if isinstance(payload, _Chunks):
            # No length: the answer ends when the connection closes (HTTP/1.1).
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for event in payload.events():
                self.wfile.write(event)
                self.wfile.flush()
            return
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass
