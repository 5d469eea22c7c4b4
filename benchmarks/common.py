"""What the benchmarks share: their environment (real PostgreSQL, RabbitMQ, Redis, own
queue and database names), Django set-up, and the benchmark database."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV = {
    "DATABASE_URL": os.environ.get(
        "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agents_bench"
    ),
    "CELERY_BROKER_URL": os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"),
    "AGENTS_QUEUE": "bench.agents.steps",
    "AGENTS_DEAD_LETTER_EXCHANGE": "bench.agents.dlx",
    "AGENTS_DEAD_LETTER_QUEUE": "bench.agents.dead",
    "AGENTS_MODULES": "benchmarks.bench_tasks",
    "AGENTS_VAR_DIR": str(ROOT / "var" / "bench"),
    "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
    "DJANGO_SETTINGS_MODULE": "agents_project.settings",
}


def setup(**extra: str) -> dict[str, str]:
    """Set the benchmark environment in this process, start Django, prepare the
    database and empty the queues. Returns the environment for worker processes."""
    env = {**ENV, **extra}
    os.environ.update(env)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from tests.helpers import purge_queues

    name = settings.DATABASES["default"]["NAME"]
    with connection._nodb_cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    call_command("migrate", verbosity=0)
    purge_queues()
    return env


def machine() -> str:
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )


def django_on(database: str, **extra: str) -> None:
    """Start Django in this process against ``database`` on the server of
    ``DATABASE_URL`` (default: the machine's), with the benchmarks' var folder and log
    level; ``extra``: more environment (a setting for this benchmark)."""
    server = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agents")
    os.environ.update(
        {
            "DATABASE_URL": f"{server.rsplit('/', 1)[0]}/{database}",
            "AGENTS_VAR_DIR": str(ROOT / "var" / "bench"),
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
            "DJANGO_SETTINGS_MODULE": "agents_project.settings",
            **extra,
        }
    )
    import django

    django.setup()


def fresh_database() -> None:
    """Drop and create the benchmark's database (``django_on``), then migrate it."""
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    name = settings.DATABASES["default"]["NAME"]
    with connection._nodb_cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cursor.execute(f'CREATE DATABASE "{name}"')
    call_command("migrate", verbosity=0)
