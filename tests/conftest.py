"""Test set-up: real PostgreSQL, RabbitMQ and Redis, or a loud failure.

``bin/test`` points the settings at the services on this machine. The suite refuses to
run against anything else (SQLite, the embedded broker, no Redis) rather than skip the
tests that need them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from llm.testing.chat_server import ChatServer
from tests.helpers import publishes_refused, purge_queues


def _reachable(url: str, default_port: int) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"{host}:{port} ({exc})"
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    db = settings.DATABASES["default"]
    problems = []
    if db["ENGINE"] != "django.db.backends.postgresql":
        problems.append("DATABASE_URL is not PostgreSQL")
    else:
        down = _reachable(f"postgres://{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}", 5432)
        if down:
            problems.append(f"PostgreSQL is not reachable at {down}")
    if not settings.BROKER_IS_AMQP:
        problems.append("CELERY_BROKER_URL is not RabbitMQ (amqp://)")
    elif down := _reachable(settings.CELERY_BROKER_URL, 5672):
        problems.append(f"RabbitMQ is not reachable at {down}")
    if not settings.REDIS_URL:
        problems.append("REDIS_URL is not set")
    elif down := _reachable(settings.REDIS_URL, 6379):
        problems.append(f"Redis is not reachable at {down}")
    if problems:
        pytest.exit(
            "The tests run against real services; run them with bin/test. " + "; ".join(problems),
            returncode=3,
        )


# The test files that take longest, longest first (``bin/test --durations``, per file).
# ``bin/test`` hands whole files to its processes in collection order
# (``--dist loadfile --no-loadscope-reorder``): these start first, so that none of them
# starts last and keeps one process busy long after the others are done. An ordering
# hint only: a file missing here runs after them, in the usual order.
LONGEST_FIRST = (
    "tests/integration/test_limits_and_outages.py",
    "tests/test_benchmarks.py",
    "tests/integration/test_takeover.py",
    "tests/integration/test_broker_waits.py",
    "tests/api/test_schema_as_a_tenant.py",
    "tests/api/test_schema_as_staff_without_permissions.py",
    "tests/integration/test_llm_runs.py",
    "tests/api/test_schema.py",
    "tests/integration/test_llm_gateway.py",
    "tests/integration/test_recovery.py",
    "tests/integration/test_one_live_copy.py",
    "tests/evals/test_runbook.py",
    "tests/agents_project/test_fork_safety.py",
    "tests/tools/test_mcp.py",
    "tests/integration/test_stream_limits.py",
    "tests/integration/test_demo.py",
    "tests/deploy/test_wheel.py",
    "tests/test_runbook.py",
    "tests/integration/test_timeouts.py",
    "tests/api/test_tasks.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of ``LONGEST_FIRST`` first, in that order (after pytest-django's own
    ordering, which this keeps within each file)."""
    rank = {path: index for index, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(autouse=True)
def _clean_queues() -> None:
    """Every test starts with empty work and dead-letter queues."""
    purge_queues()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="pw-bob")


@pytest.fixture
def broker_unreachable():
    """This process's publishes are refused for the whole test."""
    with publishes_refused():
        yield


@pytest.fixture
def fast_retries(settings):
    settings.AGENTS = {**settings.AGENTS, "RETRY_BACKOFF": 0.01, "RETRY_BACKOFF_MAX": 0.05}


@pytest.fixture
def chat(settings) -> Iterator[ChatServer]:
    """A scripted chat-completions server on loopback (``llm.testing.chat_server``), and
    this process's settings pointing at it (model ``scripted``; workers get it from
    ``tests.integration.llm_helpers.llm_env``)."""
    server = ChatServer()
    with server.running():
        settings.LLM = {
            **settings.LLM,
            "BASE_URL": server.url,
            "MODEL": "scripted",
            "API_KEY": "",
            "MODELS": {},
            "OWNER_DAILY_TOKENS": 0,
            "TIMEOUT": 10.0,
        }
        yield server
