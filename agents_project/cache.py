"""The Django cache on Redis, cleared without touching anyone else's keys.

Django's own ``RedisCache.clear()`` sends ``FLUSHDB`` (``django/core/cache/backends/
redis.py``): it empties the whole Redis database, which here also holds the circuit
breakers (``tools.breakers``: an operator's hold, open periods, trial leases) and the
LLM rate limits (``llm.client``), and may hold another deployment's keys under another
``AGENTS_REDIS_KEY_PREFIX``. A test fixture that cleared the throttle counters this way
released a breaker an operator held open in a concurrent test. Neither Django nor
django-redis offers a prefix-scoped clear, so this subclass deletes only the keys under
the cache's ``KEY_PREFIX`` (``<AGENTS_REDIS_KEY_PREFIX>:cache`` in settings).
"""

from __future__ import annotations

import re

from django.core.cache.backends.redis import RedisCache
from django.core.exceptions import ImproperlyConfigured

# Keys deleted per UNLINK.
_BATCH = 500


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern (glob-style, ``\\`` escapes)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class PrefixedRedisCache(RedisCache):
    """``django.core.cache.backends.redis.RedisCache`` whose ``clear()`` removes only
    the keys under its ``KEY_PREFIX`` (every version), by ``SCAN`` and ``UNLINK`` in
    batches of 500, never ``FLUSHDB``. ``clear()`` raises ``ImproperlyConfigured`` if
    ``KEY_PREFIX`` is empty (then every key of the database would be this cache's);
    ``redis.RedisError`` if Redis is unreachable."""

    def clear(self) -> None:
        if not self.key_prefix:
            raise ImproperlyConfigured("PrefixedRedisCache needs a KEY_PREFIX to clear")
        client = self._cache.get_client(None, write=True)
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{_glob_escape(self.key_prefix)}:*", count=_BATCH):
            batch.append(key)
            if len(batch) >= _BATCH:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
