"""API clients authenticated with DRF tokens: a user, another user, an operator (staff in
the ``operators`` group), a staff user who may only read tasks, and a staff user with
no permission at all."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from agents.permissions import operator_group_ensure


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
    """An operator: staff, in the ``operators`` group (``manage.py operator_group``)."""
    user = django_user_model.objects.create_user(username="olga", password="pw", is_staff=True)
    user.groups.add(operator_group_ensure())
    return user


@pytest.fixture
def viewer(django_user_model):
    """Staff who may read every task and dead letter, and operate none."""
    user = django_user_model.objects.create_user(username="vera", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=("view_agenttask", "view_deadletter"))
    )
    return user


@pytest.fixture
def bare_staff(django_user_model):
    """Staff with no permission: ``is_staff`` alone grants nothing."""
    return django_user_model.objects.create_user(username="stan", password="pw", is_staff=True)


@pytest.fixture
def viewer_api(viewer) -> APIClient:
    return token_client(viewer)


@pytest.fixture
def bare_staff_api(bare_staff) -> APIClient:
    return token_client(bare_staff)


@pytest.fixture
def api(user) -> APIClient:
    return token_client(user)


@pytest.fixture
def other_api(other_user) -> APIClient:
    return token_client(other_user)


@pytest.fixture
def staff_api(staff) -> APIClient:
    return token_client(staff)
