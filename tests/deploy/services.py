"""A private corner of this machine's PostgreSQL, RabbitMQ and Redis for a deployment
check (the wheel test, bin/validate-image): its own database, queue and exchange names
and Redis key prefix, made before the check and removed after it, also when it fails.

The servers are the ones the test suite uses (``DATABASE_URL``, ``CELERY_BROKER_URL``
and ``REDIS_URL`` as bin/test sets them, or this machine's defaults); nothing else in
them is touched. A server that is down fails the check loudly.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from kombu import Connection

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/{db}"


def _with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Namespace:
    """One check's names: ``name`` is letters, digits and ``_`` (a database name)."""

    name: str
    database_url: str
    broker_url: str
    redis_url: str

    @property
    def database(self) -> str:
        return urlsplit(self.database_url).path.lstrip("/")

    @property
    def app_role(self) -> str:
        """The role web and workers run as (``manage.py db_app_role`` makes it)."""
        return f"app_{self.name}"

    @property
    def app_database_url(self) -> str:
        parts = urlsplit(self.database_url)
        netloc = f"{self.app_role}:pw-{self.name}@{parts.hostname}:{parts.port or 5432}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def queues(self) -> dict[str, str]:
        """The ``AGENTS_*`` variables that give a deployment its own queues and keys."""
        return {
            "AGENTS_QUEUE": f"{self.name}.agents.steps",
            "AGENTS_DEAD_LETTER_EXCHANGE": f"{self.name}.agents.dlx",
            "AGENTS_DEAD_LETTER_QUEUE": f"{self.name}.agents.dead",
            "AGENTS_HANDOFF_QUEUE": f"{self.name}.agents.handoff",
            "AGENTS_REDIS_KEY_PREFIX": self.name,
        }


def namespace(label: str) -> Namespace:
    """A new namespace on this machine's servers: ``<label>_<random>``."""
    name = f"{label}_{uuid.uuid4().hex[:10]}".lower()
    server = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_db = zlib.crc32(name.encode()) % 15 + 1
    return Namespace(
        name=name,
        database_url=_with_path(server, f"/agents_{name}"),
        broker_url=os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL,
        redis_url=os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL.format(db=redis_db),
    )


def _admin(ns: Namespace) -> psycopg.Connection:
    return psycopg.connect(_with_path(ns.database_url, "/postgres"), autocommit=True)


def create(ns: Namespace) -> None:
    """The empty database (queues are declared by the deployment itself)."""
    with _admin(ns) as conn:
        conn.execute(f'CREATE DATABASE "{ns.database}"')
    redis.Redis.from_url(ns.redis_url).ping()
    with Connection(ns.broker_url, connect_timeout=10) as conn:
        conn.ensure_connection(max_retries=1)


def drop(ns: Namespace) -> list[str]:
    """Remove everything of the namespace; returns what could not be removed (each part
    is tried whatever happened to the others)."""
    problems = []
    try:
        with _admin(ns) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{ns.database}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{ns.app_role}"')
    except psycopg.Error as exc:
        problems.append(f"database {ns.database}: {exc}")
    names = ns.queues
    try:
        with Connection(ns.broker_url, connect_timeout=10) as conn:
            channel = conn.default_channel
            for queue in ("AGENTS_QUEUE", "AGENTS_DEAD_LETTER_QUEUE", "AGENTS_HANDOFF_QUEUE"):
                channel.queue_delete(names[queue])
            for exchange in ("AGENTS_QUEUE", "AGENTS_DEAD_LETTER_EXCHANGE", "AGENTS_HANDOFF_QUEUE"):
                channel.exchange_delete(names[exchange])
    except Exception as exc:  # any broker error: report it, clean the rest
        problems.append(f"queues {ns.name}.agents.*: {exc}")
    try:
        client = redis.Redis.from_url(ns.redis_url)
        keys = list(client.scan_iter(match=f"{ns.name}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError as exc:
        problems.append(f"Redis keys {ns.name}:*: {exc}")
    return problems


@contextlib.contextmanager
def private(label: str) -> Iterator[Namespace]:
    ns = namespace(label)
    try:
        create(ns)
        yield ns
    finally:
        problems = drop(ns)
        if problems:
            raise RuntimeError("clean-up failed: " + "; ".join(problems))
