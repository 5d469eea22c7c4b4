"""Provider trouble, through the real SDK against the scripted server: what each kind
of failure becomes (``llm.client``), and the shared rate limit."""

from __future__ import annotations

import socket

import pytest

from agents.errors import CircuitOpen, PermanentError, RetryableError, RetryLater
from llm.client import (
    ContextTooLong,
    MalformedResponse,
    chat_complete,
    model_config,
    rate_limit_acquire,
    retry_after,
)

HELLO = [{"role": "user", "content": "hello"}]


def ask(config=None, **kwargs):
    return chat_complete(config=config or model_config(), messages=HELLO, transitions=[], **kwargs)


def test_an_answer_comes_with_usage(chat):
    chat.script = [{"content": "hi"}]
    reply = ask()
    assert reply.content == "hi"
    assert reply.finish_reason == "stop"
    assert reply.total_tokens == reply.prompt_tokens + reply.completion_tokens > 0
    assert reply.usage_estimated is False


def test_without_usage_the_estimate_is_used(chat):
    chat.script = [{"content": "hi", "usage": False}]
    reply = ask(estimated_tokens=7)
    assert reply.usage_estimated is True
    assert reply.prompt_tokens == 7


def test_429_and_503_with_retry_after_wait_that_long(chat):
    chat.script = [{"status": 429, "retry_after": 3}, {"status": 503, "retry_after": 1.5}]
    with pytest.raises(RetryLater) as first:
        ask()
    assert first.value.delay == 3
    with pytest.raises(RetryLater) as second:
        ask()
    assert second.value.delay == 1.5


def test_a_500_a_malformed_answer_and_a_slow_one_are_retryable(chat, settings):
    settings.LLM = {**settings.LLM, "TIMEOUT": 0.5}
    chat.script = [{"status": 500}, {"malformed": True}, {"delay": 2, "content": "late"}]
    with pytest.raises(RetryableError) as error:
        ask()
    assert not isinstance(error.value, RetryLater)
    with pytest.raises(MalformedResponse):
        ask()
    with pytest.raises(RetryableError, match="no answer within"):
        ask()


def test_context_too_long_and_other_4xx_are_permanent(chat):
    chat.script = [{"status": 400, "code": "context_length_exceeded"}, {"status": 401}]
    with pytest.raises(ContextTooLong):
        ask()
    with pytest.raises(PermanentError) as error:
        ask()
    assert not isinstance(error.value, ContextTooLong)


def test_connection_failures_open_the_endpoint_s_breaker(settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.AGENTS = {**settings.AGENTS, "BREAKER_FAIL_MAX": 2, "BREAKER_RESET_TIMEOUT": 30}
    settings.LLM = {**settings.LLM, "BASE_URL": f"http://127.0.0.1:{port}/v1", "MODEL": "m"}
    config = model_config()
    from tools.breakers import force_close

    force_close(config.breaker, actor="test")
    transitions: list = []
    for _ in range(2):
        with pytest.raises(RetryableError):
            chat_complete(config=config, messages=HELLO, transitions=transitions)
    assert [t.to_state for t in transitions][-1] == "open"
    with pytest.raises(CircuitOpen):
        chat_complete(config=config, messages=HELLO, transitions=transitions)
    force_close(config.breaker, actor="test")


def test_the_rate_limit_is_shared_through_redis(chat, settings):
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(f"*{settings.REDIS_KEY_PREFIX}:llm-*"):
        client.delete(key)
    settings.LLM = {**settings.LLM, "MODELS": {"scripted": {"rpm": 2, "tpm": 100}}}
    config = model_config()
    rate_limit_acquire(config=config, tokens=10)
    rate_limit_acquire(config=config, tokens=10)
    with pytest.raises(RetryLater, match="rate limit"):
        rate_limit_acquire(config=config, tokens=10)
    with pytest.raises(PermanentError):
        rate_limit_acquire(config=config, tokens=1000)


def test_retry_after_reads_seconds_dates_and_milliseconds():
    assert retry_after({"retry-after": "2"}) == 2
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0
    assert retry_after({}) is None
