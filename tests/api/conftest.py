"""API clients authenticated with DRF tokens, for a user, another user and staff."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient


def token_client(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture(autouse=True)
def _fresh_throttle_counters() -> None:
    # Throttle counters live in the cache (Redis): one test's requests must not count
    # against the next one's budget.
    cache.clear()


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user(username="olga", password="pw", is_staff=True)


@pytest.fixture
def api(user) -> APIClient:
    return token_client(user)


@pytest.fixture
def other_api(other_user) -> APIClient:
    return token_client(other_user)


@pytest.fixture
def staff_api(staff) -> APIClient:
    return token_client(staff)
