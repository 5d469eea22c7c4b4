"""Clearing the Django cache (throttle counters) leaves every other key in Redis alone:
a breaker an operator holds open, the LLM rate limits, another deployment's keys."""

from __future__ import annotations

import pytest
import redis
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured

from agents_project.cache import PrefixedRedisCache
from tests.console import BREAKER_NAME, held_open
from tools import breakers


@pytest.fixture
def client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def test_clearing_the_cache_keeps_a_held_open_breaker_and_foreign_keys(client):
    # The flake this came from: an API test's fixture cleared the throttle counters with
    # Django's RedisCache.clear() (FLUSHDB) while another test held a breaker open.
    foreign = f"{settings.REDIS_KEY_PREFIX}-other:1:throttle_x"
    client.set(foreign, "kept")
    try:
        with held_open():
            cache.set("throttle_user_1", [1.0, 2.0])
            cache.set("old", "v", version=7)
            assert cache.get("throttle_user_1") == [1.0, 2.0]
            cache.clear()
            assert cache.get("throttle_user_1") is None
            assert cache.get("old", version=7) is None
            assert breakers.breaker_status(BREAKER_NAME).forced is True
        assert client.get(foreign) == b"kept"
    finally:
        client.delete(foreign)


def test_the_cache_prefix_is_escaped_in_the_scan_pattern(client):
    prefix = f"{settings.REDIS_KEY_PREFIX}:t[e]st*"
    odd = PrefixedRedisCache(settings.REDIS_URL, {"KEY_PREFIX": prefix})
    lookalike = f"{settings.REDIS_KEY_PREFIX}:test:1:k"
    client.set(lookalike, "kept")
    try:
        odd.set("k", "gone")
        odd.clear()
        assert odd.get("k") is None
        assert client.get(lookalike) == b"kept"
    finally:
        client.delete(lookalike)


def test_a_cache_without_a_prefix_refuses_to_clear():
    with pytest.raises(ImproperlyConfigured, match="KEY_PREFIX"):
        PrefixedRedisCache(settings.REDIS_URL, {}).clear()
