"""Operating tools: forcing circuit breakers, and the data the built-in tools keep.

(Credentials: ``tools.credentials``; the breakers themselves: ``tools.breakers``.)
"""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

import structlog
from django.db import transaction
from django.utils import timezone

from agents_project.errors import InvalidInput, NotFound
from tools import breakers
from tools.breakers import BreakerStatus
from tools.models import KVEntry

logger = structlog.get_logger(__name__)


# A breaker name as tools make them: "weather-api", "http:api.example.com:443".
BREAKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\[\]@/-]{0,199}")


def _known_breaker(name: str) -> None:
    if name not in breakers.breaker_names():
        raise NotFound(f"no circuit breaker {name!r}", field="name")


def breaker_force_open(*, name: str, actor: str) -> BreakerStatus:
    """Hold the breaker ``name`` open: calls through it fail fast and their steps wait,
    with no trial calls, until ``breaker_force_close``. Safe to call twice.

    For a dependency known to be down or under maintenance, including one nothing has
    called yet (planned maintenance): the name is then registered, listed from now on,
    and the first call through a breaker of exactly that name waits. ``InvalidInput``
    (field ``name``) for a name no tool could use: 1 to 200 characters, letters, digits
    and ``. _ : - / @ [ ]``, starting with a letter or digit.
    """
    if not isinstance(name, str) or not BREAKER_NAME.fullmatch(name):
        raise InvalidInput(
            "must be a breaker name such as 'weather-api' or 'http:api.example.com:443'",
            field="name",
        )
    known = name in breakers.breaker_names()
    breakers.force_open(name, actor=actor)
    logger.warning(
        "circuit breaker held open by an operator", breaker=name, actor=actor, used_before=known
    )
    return breakers.breaker_status(name)


def breaker_force_close(*, name: str, actor: str) -> BreakerStatus:
    """Close the breaker ``name`` now, releasing an operator's hold; calls go through
    again and its failure count starts from zero. Safe to call twice."""
    _known_breaker(name)
    breakers.force_close(name, actor=actor)
    logger.warning("circuit breaker closed by an operator", breaker=name, actor=actor)
    return breakers.breaker_status(name)


def kv_set(*, owner_id: int, task_id: UUID | None, key: str, value: Any) -> KVEntry:
    """Store ``value`` under ``key`` for one task (``task_id``) or for all the owner's
    tasks (``task_id`` None). Idempotent: setting the same value twice changes nothing."""
    with transaction.atomic():
        entry, _ = KVEntry.objects.update_or_create(
            owner_id=owner_id,
            task_id=task_id,
            key=key,
            defaults={"value": value, "updated_at": timezone.now()},
        )
    return entry
