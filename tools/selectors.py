"""Reading tool state: circuit breakers, and the built-in key-value store."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from agents_project.errors import NotFound
from tools import breakers
from tools.breakers import BreakerStatus
from tools.models import KVEntry


def breaker_states() -> list[BreakerStatus]:
    """Every circuit breaker, by name: state, failure count, when it opened and how long
    until its trial call (for the API, the admin and metrics). Raises
    ``redis.RedisError`` if Redis is unreachable."""
    return breakers.breaker_states()


def breaker_known(*, name: str) -> bool:
    """Whether a tool declares the breaker ``name`` or any process has used it."""
    return name in breakers.breaker_names()


def breaker_get(*, name: str) -> BreakerStatus:
    if name not in breakers.breaker_names():
        raise NotFound(f"no circuit breaker {name!r}", field="name")
    return breakers.breaker_status(name)


def kv_get(*, owner_id: int, task_id: UUID | None, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of ``key`` in one task's store (``task_id``) or its owner's."""
    entry = KVEntry.objects.filter(owner_id=owner_id, task_id=task_id, key=key).first()
    return (True, entry.value) if entry is not None else (False, None)
