"""Operating tools: forcing circuit breakers, and the data the built-in tools keep.

(Credentials: ``tools.credentials``; the breakers themselves: ``tools.breakers``.)
"""

from __future__ import annotations

import json
import re
from typing import Any
from uuid import UUID

import structlog
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from agents_project.errors import InvalidInput, NotFound
from agents_project.validation import json_value_check
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
    tasks (``task_id`` None). Idempotent: setting the same value twice changes nothing.

    Quotas per owner (``InvalidInput``): a value of at most ``AGENTS_KV_MAX_VALUE_BYTES``
    of JSON (and ``AGENTS_MAX_JSON_DEPTH`` deep), at most ``AGENTS_KV_MAX_KEYS`` keys over
    all the owner's scopes. The owner's row is locked while counting, so concurrent
    writes cannot pass the limit together.
    """
    limit = settings.AGENTS["KV_MAX_VALUE_BYTES"]
    json_value_check(value, field="value")
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > limit:
        raise InvalidInput(f"is {size} bytes; kv values are at most {limit}", field="value")
    with transaction.atomic():
        get_user_model().objects.select_for_update().filter(pk=owner_id).exists()
        exists = KVEntry.objects.filter(owner_id=owner_id, task_id=task_id, key=key).exists()
        max_keys = settings.AGENTS["KV_MAX_KEYS"]
        if not exists and KVEntry.objects.filter(owner_id=owner_id).count() >= max_keys:
            raise InvalidInput(
                f"the owner already keeps {max_keys} keys (AGENTS_KV_MAX_KEYS)", field="key"
            )
        entry, _ = KVEntry.objects.update_or_create(
            owner_id=owner_id,
            task_id=task_id,
            key=key,
            defaults={"value": value, "updated_at": timezone.now()},
        )
    return entry
