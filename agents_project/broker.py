"""The embedded broker: Celery over a SQLite file, for the zero-setup demo.

kombu ships a SQLAlchemy transport that works on SQLite (it takes ``BEGIN IMMEDIATE``
before claiming a message, so two processes never claim the same one), but it polls
once a second and hands every transport option, ``polling_interval`` included, to
SQLAlchemy's ``create_engine``, which refuses unknown arguments. This subclass keeps
kombu's storage and claiming, and only fixes those two things: the polling interval is
taken out of the engine options and honoured, and the file is put in WAL mode so
publishers do not block the consumer. ``tests/test_broker.py`` hands hundreds of
messages between real processes through it.

It is registered as the ``embedded`` transport: ``embedded+sqlite:///path/broker.sqlite3``.

Like every kombu virtual transport it keeps unacknowledged messages in the consumer's
memory: a worker killed with SIGKILL loses the message it held. The runtime does not
rely on the broker for that case: the scheduler's stuck-task sweep publishes the step
again (see ``agents.core.scheduler``). RabbitMQ is the broker for production.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as SQLAlchemyChannel
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

# Options that belong to kombu or Celery, never to create_engine().
_NOT_FOR_ENGINE = {
    "queue_tablename",
    "message_tablename",
    "callback",
    "errback",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "retry_errors",
    "polling_interval",
    "confirm_publish",
}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Channel(SQLAlchemyChannel):
    def _engine_from_config(self) -> Engine:
        conninfo = self.connection.client
        options = {k: v for k, v in conninfo.transport_options.items() if k not in _NOT_FOR_ENGINE}
        options.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(conninfo.hostname, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine


class Transport(SQLAlchemyTransport):
    Channel = Channel
    polling_interval = 0.05


TRANSPORT_ALIASES.setdefault("embedded", "agents_project.broker:Transport")
