"""Issue 23, item 3: guessing is throttled.

Failed token authentications are counted per client address and per token prefix (DRF
authenticates before its throttles run, so they never saw them): past the limit, 429
with Retry-After, a right token included. A malformed token is a 401, never a 500.
Tokens expire and rotate (the API and ``drf_create_token --reset``). The admin login
locks a username out of an address after ``AXES_FAILURE_LIMIT`` failures (django-axes).
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

LIMIT = 5


@pytest.fixture
def low_limit(settings):
    settings.AGENTS = {**settings.AGENTS, "AUTH_FAIL_LIMIT": LIMIT, "AUTH_FAIL_WINDOW": 60}


def _get(token: str, address: str = "203.0.113.7", **extra):
    client = APIClient(REMOTE_ADDR=address)
    return client.get("/api/tasks/", HTTP_AUTHORIZATION=f"Token {token}", **extra)


def test_failed_tokens_from_one_address_are_throttled_even_the_right_one(user, low_limit):
    right = Token.objects.create(user=user).key
    codes = [_get(secrets.token_hex(20)).status_code for _ in range(LIMIT + 3)]
    assert codes == [401] * LIMIT + [429] * 3
    refused = _get(right)
    assert refused.status_code == 429
    assert 0 < int(refused["Retry-After"]) <= 60
    assert refused.json()["error"] == "throttled"
    # Another address is not held back by this one's failures.
    assert _get(right, address="198.51.100.9").status_code == 200


def test_failures_with_one_token_prefix_are_throttled_across_addresses(user, low_limit):
    prefix = "abcd1234"
    codes = [
        _get(prefix + secrets.token_hex(16), address=f"192.0.2.{n}").status_code
        for n in range(LIMIT + 2)
    ]
    assert codes == [401] * LIMIT + [429] * 2
    assert _get("ffff0000" + secrets.token_hex(16), address="192.0.2.200").status_code == 401


@pytest.mark.parametrize(
    "token",
    [
        "\x00" * 40,
        "abc\x00def",
        "é" * 40,
        "ÿ" * 400,
        "x" * 100_000,
        "a b",
        "'; DROP TABLE authtoken_token; --",
        "%00%ff",
        "\u2028",
        "",
        "0" * 40,
    ],
)
def test_a_malformed_token_is_a_401_never_a_500(token):
    answered = _get(token)
    assert answered.status_code == 401, answered.content[:200]


def test_an_expired_token_is_refused_and_a_rotated_one_works(user, settings):
    settings.AGENTS = {**settings.AGENTS, "API_TOKEN_MAX_AGE": 3600}
    token = Token.objects.create(user=user)
    assert _get(token.key).status_code == 200
    rotated = APIClient().post(
        "/api/token/rotate/", HTTP_AUTHORIZATION=f"Token {token.key}", REMOTE_ADDR="203.0.113.7"
    )
    assert rotated.status_code == 201
    new = rotated.json()
    assert new["token"] != token.key and new["expires_at"]
    assert _get(token.key).status_code == 401  # the old one stops at once
    assert _get(new["token"]).status_code == 200
    Token.objects.filter(key=new["token"]).update(created=timezone.now() - timedelta(hours=2))
    expired = _get(new["token"])
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    # An operator rotates it from the command line.
    call_command("drf_create_token", "--reset", user.username, stdout=StringIO())
    fresh = Token.objects.get(user=user)
    assert fresh.key != new["token"] and _get(fresh.key).status_code == 200


def test_the_admin_login_locks_out_after_repeated_failures(django_user_model, settings):
    settings.AXES_FAILURE_LIMIT = 3
    django_user_model.objects.create_user(username="ops", password="right-pw", is_staff=True)
    browser = Client(REMOTE_ADDR="203.0.113.50")

    def login(password: str):
        return browser.post("/admin/login/?next=/admin/", {"username": "ops", "password": password})

    assert [login("wrong").status_code for _ in range(2)] == [200, 200]  # the form again
    assert login("wrong").status_code == 429
    locked = login("right-pw")
    assert locked.status_code == 429
    assert "_auth_user_id" not in browser.session
    # Another address may still sign in as ops.
    other = Client(REMOTE_ADDR="198.51.100.20")
    signed_in = other.post(
        "/admin/login/?next=/admin/", {"username": "ops", "password": "right-pw"}
    )
    assert signed_in.status_code == 302
