"""Helpers shared by the tests: the real queue, drained in-process; waiting; workers."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection
from kombu import Connection

from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.core.scheduler import tick
from agents.models import AgentTask
from agents_project.topology import dead_letter_queue

WORK_QUEUE = settings.CELERY_TASK_QUEUES[0]


def broker() -> Connection:
    return Connection(settings.CELERY_BROKER_URL)


def purge_queues() -> None:
    with broker() as conn:
        channel = conn.default_channel
        for queue in (WORK_QUEUE, dead_letter_queue(settings.AGENTS)):
            bound = queue(channel)
            bound.declare()
            bound.purge()


@contextlib.contextmanager
def private_queues(label: str) -> Iterator[dict[str, str]]:
    """Queue and exchange names of this test's own (as ``AGENTS_*`` variables for a
    worker or a subprocess), deleted from the broker afterwards."""
    prefix = f"{label}-{uuid.uuid4().hex[:8]}"
    names = {
        "AGENTS_QUEUE": f"{prefix}.steps",
        "AGENTS_DEAD_LETTER_EXCHANGE": f"{prefix}.dlx",
        "AGENTS_DEAD_LETTER_QUEUE": f"{prefix}.dead",
    }
    try:
        yield names
    finally:
        with broker() as conn:
            channel = conn.default_channel
            channel.queue_delete(names["AGENTS_QUEUE"])
            channel.queue_delete(names["AGENTS_DEAD_LETTER_QUEUE"])
            channel.exchange_delete(names["AGENTS_QUEUE"])
            channel.exchange_delete(names["AGENTS_DEAD_LETTER_EXCHANGE"])


def queue_depth(queue: Any = WORK_QUEUE) -> int:
    with broker() as conn:
        _, count, _ = queue(conn.default_channel).queue_declare(passive=True)
        return count


def run_until_idle(
    *, max_messages: int = 10_000, wait: float = 0.0, wait_for_retries: bool = True
) -> list[tuple[UUID, int, str]]:
    """Play the worker in-process: take step messages off the real queue and run them.

    Runs the scheduler whenever the queue is empty (so retry timers and wake-ups fire),
    keeps going while a retry is pending, and returns once nothing has happened for
    ``wait`` seconds. Returns what each delivery did: (task id, step, result).
    """
    done: list[tuple[UUID, int, str]] = []
    idle_since = time.monotonic()
    give_up = time.monotonic() + 60
    with broker() as conn:
        queue = WORK_QUEUE(conn.default_channel)
        while len(done) < max_messages and time.monotonic() < give_up:
            message = queue.get(no_ack=False)
            if message is None:
                if any(tick(actor="scheduler:test").values()):
                    idle_since = time.monotonic()
                elif (
                    not wait_for_retries
                    or not AgentTask.objects.filter(retry_at__isnull=False).exists()
                ) and time.monotonic() - idle_since >= wait:
                    return done
                time.sleep(0.005)
                continue
            idle_since = time.monotonic()
            task_id, step, result = deliver(message)
            done.append((task_id, step, result.value))
    return done


@contextlib.contextmanager
def publishes_to(url: str) -> Iterator[None]:
    """This process publishes its steps to the broker at ``url`` for a while."""
    from agents_project.celery import app

    original = app.conf.broker_write_url
    app.conf.broker_write_url = url
    app.amqp._producer_pool = None
    try:
        yield
    finally:
        app.conf.broker_write_url = original
        app.amqp._producer_pool = None


def publishes_refused() -> contextlib.AbstractContextManager[None]:
    """This process's publishes go to a port where no broker listens: a real refusal."""
    return publishes_to("amqp://guest:guest@127.0.0.1:1//")


def deliver(message: Any) -> tuple[UUID, int, StepResult]:
    """Run one step message as a worker would, and settle it with the broker."""
    task_id, step = message.payload[0]
    result = step_execute(
        task_id=UUID(task_id),
        step=step,
        message={"args": [task_id, step]},
    )
    if result == StepResult.DEAD_LETTERED:
        message.reject(requeue=False)
    elif result == StepResult.REQUEUE:
        message.reject(requeue=True)
    else:
        message.ack()
    return UUID(task_id), step, result


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(interval)


def worker_env(**extra: str) -> dict[str, str]:
    """Environment for a worker subprocess that shares this test's database."""
    db = connection.settings_dict
    url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return {
        "DATABASE_URL": url,
        "AGENTS_SCHEDULER_INTERVAL": "0.2",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def log_dir() -> Path:
    path = Path(settings.VAR_DIR) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
