"""Fixtures of the tool tests: the flaky HTTP service, clean breakers, worker processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from tests.integration.conftest import Workers, pytest_runtest_makereport  # noqa: F401
from tests.tools.flaky_server import FlakyServer
from tools import breakers


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    server = FlakyServer().start()
    yield server
    server.stop()


def _forget_breakers() -> None:
    # Only this run's breaker keys (AGENTS_REDIS_KEY_PREFIX, set by bin/test).
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(match=f"{breakers.PREFIX}*"))
    if keys:
        client.delete(*keys)
    breakers._BREAKERS.clear()
    breakers._LOCAL_FORCED.clear()


@pytest.fixture(autouse=True)
def _fresh_breakers() -> Iterator[None]:
    """Each test starts with no breaker state, shared or in this process."""
    _forget_breakers()
    yield
    _forget_breakers()


@pytest.fixture
def workers(request, transactional_db) -> Iterator[Workers]:
    """Real worker processes (see tests/integration/conftest.py)."""
    pool = Workers(request.node.name[:40])
    yield pool
    pool.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(pool.report())


@pytest.fixture
def loopback_allowed(settings) -> dict[str, str]:
    """Opt in to reaching the loopback test servers through tools' HTTP calls, which the
    outbound policy refuses by default (``tools.outbound``). Returns the same for
    worker subprocesses, as environment variables to pass to ``workers.start``."""
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}
    return {"AGENTS_OUTBOUND_ALLOW": "127.0.0.1"}
