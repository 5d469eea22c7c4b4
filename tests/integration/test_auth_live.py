"""Issue 23, item 3 on the shipped web server: 700 wrong tokens from one address, 16 at
a time, against uvicorn: no 500, 429 with Retry-After once past the limit, and the
right token from that address throttled too while another address is served."""

from __future__ import annotations

import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rest_framework.authtoken.models import Token

from tests.integration.test_stream_limits import uvicorn_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WRONG = [
    secrets.token_hex(20),  # a well-formed guess
    "x" * 5000,
    "é" * 40,  # sent as latin-1 bytes
    "a b",
    "'; DROP TABLE authtoken_token; --",
    "%00" * 10,
]


@pytest.mark.django_db(transaction=True)
def test_guessing_tokens_on_a_live_server_is_throttled_and_never_a_500(user):
    right = Token.objects.create(user=user).key
    with uvicorn_server(AGENTS_AUTH_FAIL_LIMIT="20", AGENTS_AUTH_FAIL_WINDOW="600") as url:

        def guess(n: int) -> int:
            token = WRONG[n % len(WRONG)] if n % 7 else secrets.token_hex(20)
            with httpx.Client(timeout=30) as client:
                return client.get(
                    f"{url}/api/tasks/",
                    headers={"Authorization": f"Token {token}".encode("latin-1")},
                ).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = Counter(pool.map(guess, range(700)))
        print("700 wrong tokens:", dict(codes))
        assert set(codes) <= {401, 429}, codes
        assert codes[401] <= 20 + 16  # the limit, and at most one batch in flight past it
        with httpx.Client(timeout=30) as client:
            refused = client.get(f"{url}/api/tasks/", headers={"Authorization": f"Token {right}"})
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
            assert client.get(f"{url}/healthz").status_code == 200
        elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(timeout=30, transport=elsewhere) as client:
            served = client.get(f"{url}/api/tasks/", headers={"Authorization": f"Token {right}"})
            assert served.status_code == 200
