"""Per-user request rate limit (``API_THROTTLE_RATE``, e.g. ``600/minute``)."""

from __future__ import annotations

from rest_framework.settings import api_settings
from rest_framework.throttling import UserRateThrottle


class PerUserRateThrottle(UserRateThrottle):
    """DRF's ``UserRateThrottle``, reading its rate when a request comes rather than when
    the class is imported, so a changed setting applies without a restart of the code.

    Counters live in the default cache: Redis when ``REDIS_URL`` is set, so every web
    process counts against the same budget. Refusals are 429 with ``Retry-After``.
    """

    def get_rate(self) -> str | None:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)
