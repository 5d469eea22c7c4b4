"""The model client: one chat-completions request through the official ``openai`` SDK.

Any OpenAI-compatible server works (vLLM, Ollama, llama.cpp, a hosted API): the SDK's
``base_url`` points at it. Configuration (``settings.LLM``, from the environment):
``AGENTS_LLM_BASE_URL``, ``AGENTS_LLM_MODEL`` (the default model), ``AGENTS_LLM_API_KEY``,
and ``AGENTS_LLM_MODELS``, JSON keyed by model name. Those names and the default model
are the allow-list: no other name runs (matched exactly). Each optionally with::

    {"base_url": "http://gpu-1:8000/v1",     # else AGENTS_LLM_BASE_URL
     "api_key_credential": "openai",         # a credential of the task's owner
     "context_window": 32768,                # tokens
     "price": {"input": 0.15, "output": 0.60},  # per million tokens
     "timeout": 60, "rpm": 500, "tpm": 200000}

What provider trouble becomes (``agents.errors``; the SDK's own retries are off, the
runtime decides):

- 429, or 503 with ``Retry-After``: ``RetryLater`` after that many seconds, which does
  not spend an attempt. A 429 without the header waits ``DEFAULT_RATE_LIMIT_WAIT``.
- A timeout, a refused or broken connection, any other 5xx, a malformed answer:
  ``RetryableError`` (an attempt), counted by the circuit breaker of the model's
  endpoint (``llm:<host>:<port>``, the same breakers as tools, ``tools.breakers``);
  while it is open, calls fail at once with ``CircuitOpen`` (a ``RetryLater``).
- 400 "context too long": ``ContextTooLong`` (a ``PermanentError``), which the agent
  turns into a smaller request when its context policy can make one.
- Any other 4xx (a bad key, an unknown model): ``PermanentError``.

An evaluation run (``evals``) puts a transport in front of all this with
``chat_transport``: it replays recorded replies, or records what the server answers.

Per-model rate limits (``rpm``, ``tpm``) are counted in Redis by every worker together
(``limits``' sliding-window counters); a call that would pass one waits for it with
``RetryLater``. Without Redis (the demo), each process counts alone.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
import structlog
from django.conf import settings
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from agents.errors import PermanentError, RetryableError, RetryLater
from agents_project.errors import CircuitOpen
from llm.streaming import ChunkAccumulator
from tools.breakers import Transition, breaker_call

if TYPE_CHECKING:
    import openai

logger = structlog.get_logger(__name__)

DEFAULT_RATE_LIMIT_WAIT = 5.0
MAX_WAIT = 600.0
MILLION = Decimal(1_000_000)
# Error codes servers use for a request longer than the model's context window. vLLM
# says so only in its message; that text is matched as a last resort.
CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length", "exceed_context_size_error"}
CONTEXT_PHRASES = ("maximum context length", "context length", "context window", "too many tokens")


class ContextTooLong(PermanentError):
    """The server refused the request as longer than the model's context window."""


class ModelRefused(PermanentError):
    """The model may not run: not on the allow-list, or unpriced where a price is needed."""


class MalformedResponse(RetryableError):
    """The server answered 2xx with something that is not a chat completion."""


@dataclass(frozen=True)
class ModelConfig:
    """One model's settings (see the module docstring)."""

    name: str
    base_url: str
    api_key: str = ""
    api_key_credential: str = ""
    context_window: int | None = None
    price_input: Decimal = Decimal(0)
    price_output: Decimal = Decimal(0)
    timeout: float = 120.0
    rpm: int | None = None
    tpm: int | None = None
    # Whether the server may be asked to stream (a task asks with input "stream").
    stream: bool = True
    priced: bool = False  # AGENTS_LLM_MODELS gives its price (0 may be a real price)

    @property
    def breaker(self) -> str:
        """The circuit breaker of this model's endpoint: ``llm:<host>:<port>``."""
        parts = urlsplit(self.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"llm:{parts.hostname}:{port}"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """The price of a call, in the currency of ``price`` (per million tokens)."""
        return (prompt_tokens * self.price_input + completion_tokens * self.price_output) / MILLION


def model_config(name: str | None = None, *, need_price: bool = False) -> ModelConfig:
    """The settings of model ``name`` (None: ``AGENTS_LLM_MODEL``).

    Only the names in ``AGENTS_LLM_MODELS`` and ``AGENTS_LLM_MODEL`` run, matched
    exactly (``"m "`` is not ``"m"``); ``need_price`` (a cost budget applies) also
    requires the model's ``price`` there. A model naming ``api_key_credential`` gets no
    deployment key (``api_key`` empty): its calls use the task owner's credential or
    none. Raises ``ModelRefused`` for a name not allowed or a price missing, and
    ``PermanentError`` when no model or no server is configured.
    """
    conf = settings.LLM
    name = conf["MODEL"] if name is None else name
    if not name:
        raise PermanentError("no model: give input.model or set AGENTS_LLM_MODEL")
    allowed = set(conf["MODELS"]) | ({conf["MODEL"]} if conf["MODEL"] else set())
    if name not in allowed:
        raise ModelRefused(
            f"model {name!r} is not allowed; the models are {sorted(allowed)} "
            "(AGENTS_LLM_MODELS, AGENTS_LLM_MODEL)"
        )
    own = conf["MODELS"].get(name) or {}
    given = own.get("price")
    price: dict[str, Any] = given if isinstance(given, dict) else {}
    priced = "input" in price and "output" in price
    if need_price and not priced:
        raise ModelRefused(
            f"model {name!r} has no price in AGENTS_LLM_MODELS, which a cost budget "
            "(budget.cost) needs"
        )
    base_url = own.get("base_url") or conf["BASE_URL"]
    if not base_url:
        raise PermanentError(
            f"no server for model {name!r}: set AGENTS_LLM_BASE_URL or its base_url in "
            "AGENTS_LLM_MODELS"
        )
    credential = own.get("api_key_credential") or ""
    return ModelConfig(
        name=name,
        base_url=base_url,
        api_key="" if credential else conf["API_KEY"],
        api_key_credential=credential,
        context_window=own.get("context_window"),
        price_input=Decimal(str(price.get("input", 0))),
        price_output=Decimal(str(price.get("output", 0))),
        timeout=float(own.get("timeout", conf["TIMEOUT"])),
        rpm=own.get("rpm"),
        tpm=own.get("tpm"),
        stream=bool(own.get("stream", True)),
        priced=priced,
    )


@dataclass(frozen=True)
class ChatReply:
    """A chat completion as the runtime uses it."""

    response: dict[str, Any]
    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    usage_estimated: bool
    duration_ms: float


@dataclass(frozen=True)
class ChatRequest:
    """One request as a transport sees it: ``call`` is the runtime's key of the call
    (``task id : step : purpose``, the ``X-Agents-Call`` header)."""

    config: ModelConfig
    messages: Sequence[dict[str, Any]]
    tools: Sequence[dict[str, Any]]
    call: str


# (request, send) -> reply; ``send()`` makes the real request. None: always send.
Transport = Callable[[ChatRequest, Callable[[], ChatReply]], ChatReply]
_transport: ContextVar[Transport | None] = ContextVar("chat_transport", default=None)


@contextmanager
def chat_transport(transport: Transport) -> Iterator[None]:
    """While the block runs, every ``chat_complete`` of this thread goes through
    ``transport(request, send)``: it may answer from a recording without calling
    ``send`` (no rate limit, breaker or network involved), or call ``send`` and keep
    what it returns. Used by ``evals`` (``--replay`` and ``--live``)."""
    token = _transport.set(transport)
    try:
        yield
    finally:
        _transport.reset(token)


# Where this thread's streamed text goes (``streamed_to``); None: do not stream.
_on_delta: ContextVar[Callable[[str], None] | None] = ContextVar("on_delta", default=None)


@contextmanager
def streamed_to(on_delta: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, this thread's requests are streamed (``stream: true``,
    ``stream_options.include_usage``) and each piece of text goes to ``on_delta``; the
    reply returned is the whole completion, as without streaming (``llm.streaming``)."""
    token = _on_delta.set(on_delta)
    try:
        yield
    finally:
        _on_delta.reset(token)


def gateway_enabled() -> bool:
    """Whether this thread's model calls go through the model gateway
    (``AGENTS_LLM_GATEWAY``): never under ``chat_transport`` (an evaluation run answers
    in process)."""
    return bool(settings.LLM["GATEWAY"]) and _transport.get() is None


# Errors a model call can end with, as the gateway reports them to the step
# (``StepContext.handed_back``): kind -> the exception the step raises.
_NOTE_KINDS: dict[str, type[Exception]] = {
    "context_too_long": ContextTooLong,
    "permanent": PermanentError,
    "retry_later": RetryLater,
    "retryable": RetryableError,
}


def error_as_note(exc: Exception) -> dict[str, Any]:
    """``{"kind", "message", "delay"}`` of a model call's error (JSON), for the step."""
    kind = "retryable"
    for name, cls in _NOTE_KINDS.items():
        if isinstance(exc, cls):
            kind = name
            break
    note: dict[str, Any] = {"kind": kind, "message": str(exc)}
    if isinstance(exc, RetryLater):
        note["delay"] = exc.delay
    if isinstance(exc, CircuitOpen):
        note |= {"kind": "circuit_open", "breaker": exc.breaker}
    return note


def error_from_note(note: dict[str, Any]) -> Exception:
    """The exception ``error_as_note`` described (``RetryableError`` for an unknown
    kind), for the step to raise as if it had made the call itself."""
    kind, message = note.get("kind", "retryable"), str(note.get("message", "model call failed"))
    if kind == "retry_later":
        return RetryLater(message, delay=float(note.get("delay") or DEFAULT_RATE_LIMIT_WAIT))
    if kind == "circuit_open":
        return CircuitOpen(str(note.get("breaker")), delay=float(note.get("delay") or 1.0))
    return _NOTE_KINDS.get(kind, RetryableError)(message)


def chat_complete(
    *,
    config: ModelConfig,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] = (),
    api_key: str = "",
    headers: dict[str, str] | None = None,
    estimated_tokens: int = 0,
    transitions: list[Transition],
) -> ChatReply:
    """Send one chat-completions request and return the reply.

    ``estimated_tokens`` (the request's estimated prompt tokens) is what the rate
    limiter counts first; the usage the server reports corrects it afterwards.
    Breaker transitions this call causes are appended to ``transitions``. Raises the
    errors listed in the module docstring.
    """

    def send() -> ChatReply:
        return _chat_send(config, messages, tools, api_key, headers, estimated_tokens, transitions)

    transport = _transport.get()
    if transport is None:
        return send()
    request = ChatRequest(
        config=config,
        messages=messages,
        tools=tools,
        call=(headers or {}).get("X-Agents-Call", ""),
    )
    return transport(request, send)


def _chat_send(
    config: ModelConfig,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]],
    api_key: str,
    headers: dict[str, str] | None,
    estimated_tokens: int,
    transitions: list[Transition],
) -> ChatReply:
    rate_limit_acquire(config=config, tokens=estimated_tokens)
    started = time.monotonic()
    completion = breaker_call(
        name=config.breaker,
        func=lambda: _request(config, messages, tools, api_key, headers or {}),
        trial_timeout=config.timeout,
        transitions=transitions,
    )
    duration_ms = round((time.monotonic() - started) * 1000, 3)
    reply = reply_from_completion(completion, duration_ms, estimated_tokens)
    rate_limit_correct(config=config, estimated=estimated_tokens, used=reply.total_tokens)
    return reply


@lru_cache(maxsize=32)
def _client(base_url: str, api_key: str, timeout: float) -> openai.OpenAI:
    import openai  # imported where a call is made: 50 MB a worker that hands off never needs

    # One client (and connection pool) per server and key in each process. The SDK's
    # retries are off: a retry here would be a second request the runtime cannot see.
    return openai.OpenAI(
        base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0
    )


def _request(
    config: ModelConfig,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]],
    api_key: str,
    headers: dict[str, str],
) -> Any:
    # A model that names a credential never falls back to the deployment's key.
    key = api_key if config.api_key_credential else (api_key or config.api_key)
    import openai
    from openai.types.chat import ChatCompletion

    client = _client(config.base_url, key, config.timeout)
    extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
    on_delta = _on_delta.get()
    try:
        if on_delta is None:
            return client.chat.completions.create(
                model=config.name,
                messages=list(messages),  # type: ignore[arg-type]
                extra_headers=headers,
                **extra,
            )
        chunks = client.chat.completions.create(  # type: ignore[call-overload]
            model=config.name,
            messages=list(messages),
            extra_headers=headers,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        accumulator = ChunkAccumulator()
        for chunk in chunks:
            text = accumulator.feed(chunk)
            if text:
                on_delta(text)
        return ChatCompletion.model_validate(accumulator.completion())
    except openai.APITimeoutError as exc:
        raise RetryableError(
            f"model {config.name!r}: no answer within {config.timeout:g} s"
        ) from exc
    except openai.APIConnectionError as exc:
        raise RetryableError(f"model {config.name!r}: connection failed: {exc}") from exc
    except openai.APIStatusError as exc:
        raise status_error(config, exc) from exc
    except ValueError as exc:  # the body was not JSON
        raise MalformedResponse(f"model {config.name!r}: malformed answer: {exc}") from exc


def status_error(config: ModelConfig, exc: openai.APIStatusError) -> Exception:
    """The runtime's error for an HTTP error answer (see the module docstring)."""
    status = exc.status_code
    what = f"model {config.name!r}: HTTP {status}: {exc.message}"
    wait = retry_after(exc.response.headers)
    if status == 429:
        return RetryLater(what, delay=wait if wait is not None else DEFAULT_RATE_LIMIT_WAIT)
    if status == 503 and wait is not None:
        return RetryLater(what, delay=wait)
    if status >= 500:
        return RetryableError(what)
    if status == 400 and _context_too_long(exc):
        return ContextTooLong(what)
    return PermanentError(what)


def _context_too_long(exc: openai.APIStatusError) -> bool:
    if exc.code in CONTEXT_CODES or getattr(exc, "type", None) in CONTEXT_CODES:
        return True
    text = str(exc.message).lower()
    return any(phrase in text for phrase in CONTEXT_PHRASES)


def retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``
    header, between 0 and ``MAX_WAIT``; None without one."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return min(max(float(raw_ms) / 1000, 0.0), MAX_WAIT)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_WAIT)


def reply_from_completion(completion: Any, duration_ms: float, estimated_tokens: int) -> ChatReply:
    """A ``ChatReply`` of the SDK's ``ChatCompletion``; ``MalformedResponse`` if it is
    not one. Usage missing: estimated from ``estimated_tokens`` and the reply's length."""
    if isinstance(completion, str) or not getattr(completion, "choices", None):
        raise MalformedResponse(f"malformed answer: {str(completion)[:200]!r}")
    data = completion.model_dump(mode="json", exclude_unset=True)
    choice = completion.choices[0]
    message = choice.message
    calls = []
    for call in message.tool_calls or ():
        function = getattr(call, "function", None)
        if function is None:
            continue
        calls.append(
            {
                # Some servers (llama.cpp, LM Studio) send "" or no id: the id is set
                # where the reply is recorded (tool_call_ids), from the step.
                "id": getattr(call, "id", None) or "",
                "type": "function",
                "function": {"name": function.name, "arguments": function.arguments or "{}"},
            }
        )
    content = message.content or ""
    usage = completion.usage
    if usage is not None and usage.prompt_tokens is not None:
        prompt, completion_tokens = usage.prompt_tokens, usage.completion_tokens or 0
        total = usage.total_tokens or prompt + completion_tokens
        estimated = False
    else:
        prompt = estimated_tokens
        completion_tokens = 4 + (len(content) + len(json.dumps(calls))) // 4
        total, estimated = prompt + completion_tokens, True
    return ChatReply(
        response=data,
        content=content,
        tool_calls=calls,
        finish_reason=choice.finish_reason or "",
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=total,
        usage_estimated=estimated,
        duration_ms=duration_ms,
    )


def tool_call_ids(response: dict[str, Any], step: int) -> dict[str, Any]:
    """``response`` (a chat completion as JSON) with an id on every tool call of its
    first choice: a call whose id is missing, empty, not a string or the same as an
    earlier call's of this reply gets ``call_<step>_<index>`` (``index`` counts the
    reply's calls from 0). Servers such as llama.cpp and LM Studio send ``""`` or no
    id; without one the call and its result cannot be paired in later requests.

    Deterministic, and the identity on a response whose ids are all set and distinct,
    so applying it again (to a record made before it existed) gives the same ids.
    """
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return response
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return response
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return response
    seen: set[str] = set()
    fixed = []
    for index, call in enumerate(calls):
        if not isinstance(call, dict):
            fixed.append(call)
            continue
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id or call_id in seen:
            call = {**call, "id": f"call_{step}_{index}"}
        seen.add(call["id"])
        fixed.append(call)
    if fixed == calls:
        return response
    return {
        **response,
        "choices": [{**choices[0], "message": {**message, "tool_calls": fixed}}, *choices[1:]],
    }


# --- Per-model rate limits, shared through Redis ------------------------------------------


@lru_cache(maxsize=4)
def _limiter(url: str) -> SlidingWindowCounterRateLimiter:
    return SlidingWindowCounterRateLimiter(storage_from_string(url or "memory://"))


def _namespace(kind: str) -> str:
    """The Redis key namespace of a rate limit (``AGENTS_REDIS_KEY_PREFIX``)."""
    return f"{settings.REDIS_KEY_PREFIX}:llm-{kind}"


def _limits(config: ModelConfig, tokens: int) -> list[tuple[Any, int]]:
    items: list[tuple[Any, int]] = []
    if config.rpm:
        items.append(
            (
                RateLimitItemPerMinute(
                    config.rpm, namespace=f"{settings.REDIS_KEY_PREFIX}:llm-rpm"
                ),
                1,
            )
        )
    if config.tpm:
        items.append(
            (
                RateLimitItemPerMinute(
                    config.tpm, namespace=f"{settings.REDIS_KEY_PREFIX}:llm-tpm"
                ),
                tokens,
            )
        )
    return items


def rate_limit_acquire(*, config: ModelConfig, tokens: int) -> None:
    """Count one request of ``tokens`` against the model's limits, or raise
    ``RetryLater`` until the window has room (``PermanentError`` if it never can)."""
    items = _limits(config, tokens)
    if not items:
        return
    if config.tpm and tokens > config.tpm:
        raise PermanentError(
            f"model {config.name!r}: a request of about {tokens} tokens can never fit its "
            f"limit of {config.tpm} tokens per minute"
        )
    try:
        limiter = _limiter(settings.REDIS_URL)
        for item, cost in items:
            if not limiter.test(item, config.name, cost=cost):
                stats = limiter.get_window_stats(item, config.name)
                delay = min(max(stats.reset_time - time.time(), 0.5), 60.0)
                raise RetryLater(
                    f"model {config.name!r}: rate limit {item} reached; waiting", delay=delay
                )
        for item, cost in items:
            limiter.hit(item, config.name, cost=cost)
    except redis.RedisError as exc:
        logger.warning("rate limit unavailable; calling unlimited", error=repr(exc))


def rate_limit_correct(*, config: ModelConfig, estimated: int, used: int) -> None:
    """Count the tokens a call used beyond its estimate."""
    if not config.tpm or used <= estimated:
        return
    item = RateLimitItemPerMinute(config.tpm, namespace=_namespace("tpm"))
    try:
        _limiter(settings.REDIS_URL).hit(item, config.name, cost=used - estimated)
    except redis.RedisError as exc:
        logger.warning("rate limit unavailable", error=repr(exc))
