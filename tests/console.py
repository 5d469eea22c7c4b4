"""Tasks in the states the console explains, made the real way (services, the real
queue, the in-process worker), and a circuit breaker held open for one test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis
from django.conf import settings

from agents.models import AgentTask, TaskStatus
from tests.api.factories import started
from tests.helpers import run_until_idle
from tools import breakers

# Port 9 (discard) on loopback: nothing is ever called, the breaker is held open first.
BREAKER_URL = "http://127.0.0.1:9/status"
BREAKER_NAME = "http:127.0.0.1:9"


@contextlib.contextmanager
def held_open(name: str = BREAKER_NAME) -> Iterator[str]:
    """The breaker ``name`` held open by an operator; forgotten afterwards."""
    breakers.force_open(name, actor="user:ops")
    try:
        yield name
    finally:
        client = redis.Redis.from_url(settings.REDIS_URL)
        keys = list(client.scan_iter(match=f"{breakers.PREFIX}:{name}*"))
        if keys:
            client.delete(*keys)
        client.srem(breakers.NAMES_KEY, name)
        breakers._BREAKERS.pop((settings.REDIS_URL, name), None)


def waiting_on_breaker(owner: Any) -> AgentTask:
    """A running task whose step met an open breaker and waits to run again (call it
    inside ``held_open()``)."""
    task = started(
        owner, {"script": [{"tool": "http.get", "args": {"url": BREAKER_URL}}, {"final": 1}]}
    )
    run_until_idle(wait_for_retries=False)
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.retry_at is not None, task.status
    return task


def retrying(owner: Any) -> AgentTask:
    """A running task whose step failed once and waits for its retry timer."""
    task = started(owner, {"script": [{"think": "go"}, {"fail": "flaky upstream", "times": 9}]})
    run_until_idle(wait_for_retries=False)
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.retry_at is not None, task.status
    return task
