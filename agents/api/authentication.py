"""Token authentication that counts failures and lets tokens expire.

DRF authenticates before its throttles run, so a failed authentication is never
counted by them: guessing tokens was unlimited. ``ThrottledTokenAuthentication``
counts each failed token authentication per client address and per token prefix (its
first ``PREFIX_LENGTH`` characters) in the shared cache (Redis), over a fixed window of
``AGENTS_AUTH_FAIL_WINDOW`` seconds. Past ``AGENTS_AUTH_FAIL_LIMIT`` failures of either,
every token authentication from that address (or with that prefix) is answered 429 with
``Retry-After`` until the window ends, a right token included: a guesser learns nothing.

A token older than ``AGENTS_API_TOKEN_MAX_AGE`` seconds (0: never) is refused as
expired (401); ``POST /api/token/rotate/`` or ``manage.py drf_create_token --reset
USER`` replaces it. A malformed token (any bytes, any length) is a 401, never a 500.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

logger = structlog.get_logger(__name__)

PREFIX_LENGTH = 8


class AuthThrottled(exceptions.Throttled):
    default_detail = "Too many failed authentications."


def client_address(request: Request) -> str:
    """The client's address as DRF's throttles see it (``NUM_PROXIES`` of
    ``REST_FRAMEWORK`` decides whether ``X-Forwarded-For`` is trusted)."""
    return str(BaseThrottle().get_ident(request))[:100]


def _keys(request: Request, token: str) -> list[str]:
    prefix = token[:PREFIX_LENGTH].encode("utf-8", "backslashreplace").hex()
    return [f"authfail:addr:{client_address(request)}", f"authfail:prefix:{prefix}"]


def _window_key(key: str, window: int) -> str:
    return f"{key}:{int(time.time()) // window}"


def _retry_after(window: int) -> int:
    return window - int(time.time()) % window


def auth_failures_exceeded(request: Request, token: str) -> int | None:
    """Seconds to wait if this address or token prefix is over the limit, else None."""
    limit, window = settings.AGENTS["AUTH_FAIL_LIMIT"], max(1, settings.AGENTS["AUTH_FAIL_WINDOW"])
    if limit <= 0:
        return None
    counts = cache.get_many([_window_key(key, window) for key in _keys(request, token)])
    if any(int(count) >= limit for count in counts.values()):
        return _retry_after(window)
    return None


def auth_failure_record(request: Request, token: str) -> None:
    """Count one failed authentication for the address and the token prefix."""
    window = max(1, settings.AGENTS["AUTH_FAIL_WINDOW"])
    for key in _keys(request, token):
        windowed = _window_key(key, window)
        cache.add(windowed, 0, timeout=window + 1)
        try:
            cache.incr(windowed)
        except ValueError:  # expired between add and incr: start again
            cache.set(windowed, 1, timeout=window + 1)


class ThrottledTokenAuthentication(TokenAuthentication):
    """``Authorization: Token <key>`` with failures counted, throttled and expiring
    tokens (see the module's docstring)."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if isinstance(header, str):  # WSGI and ASGI give latin-1 text; anything else: "?"
            header = header.encode("latin-1", "replace")
        parts = header.split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None
        token = b" ".join(parts[1:]).decode("latin-1")
        wait = auth_failures_exceeded(request, token)
        if wait is not None:
            raise AuthThrottled(wait=wait)
        try:
            if len(parts) != 2:
                raise exceptions.AuthenticationFailed(
                    "Invalid token header: send 'Authorization: Token <key>', one key."
                )
            return self.authenticate_credentials(token)
        except exceptions.AuthenticationFailed:
            auth_failure_record(request, token)
            logger.info("token authentication failed", address=client_address(request))
            raise

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        if not key or len(key) > 40 or not key.isascii() or not key.isalnum():
            raise exceptions.AuthenticationFailed("Invalid token.")
        # Only the shape of a key reaches the database (a NUL byte, say, is refused).
        user, token = super().authenticate_credentials(key)
        max_age = settings.AGENTS["API_TOKEN_MAX_AGE"]
        if max_age and token.created < timezone.now() - timedelta(seconds=max_age):
            raise exceptions.AuthenticationFailed(
                "Token expired: rotate it (POST /api/token/rotate/ before it expires, or "
                "manage.py drf_create_token --reset USERNAME)."
            )
        return user, token


def api_token_rotate(user: Any) -> Any:
    """Replace ``user``'s API token with a new one (the old key stops working at once)
    and return it (``rest_framework.authtoken`` ``Token``)."""
    from django.db import transaction
    from rest_framework.authtoken.models import Token

    with transaction.atomic():
        Token.objects.filter(user=user).delete()
        token = Token.objects.create(user=user)
    logger.info("api token rotated", user=user.get_username())
    return token


def api_token_expires_at(token: Any) -> Any:
    """When ``token`` stops being accepted (``AGENTS_API_TOKEN_MAX_AGE``), or None."""
    max_age = settings.AGENTS["API_TOKEN_MAX_AGE"]
    return token.created + timedelta(seconds=max_age) if max_age else None
