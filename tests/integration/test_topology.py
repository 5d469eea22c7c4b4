"""The queue topology a worker declares, read back from the real RabbitMQ."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import private_queues, wait_until

pytestmark = pytest.mark.integration


def _rabbitmqctl(*args: str) -> list[dict]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args, "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return json.loads(out or "[]")


def _queues() -> dict[str, dict]:
    rows = _rabbitmqctl("list_queues", "name", "type", "durable", "arguments")
    return {row["name"]: row for row in rows}


def test_a_worker_declares_a_quorum_work_queue_with_dead_lettering(workers):
    with private_queues("topology") as names:
        workers.start(
            concurrency=1, **names, AGENTS_DELIVERY_LIMIT="7", AGENTS_QUEUE_MAX_LENGTH="12345"
        )
        queues = wait_until(
            lambda: (
                (q := _queues())
                and names["AGENTS_QUEUE"] in q
                and names["AGENTS_DEAD_LETTER_QUEUE"] in q
                and q
            ),
            timeout=60,
        )
        bindings = _rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
        workers.stop_all()
    work = queues[names["AGENTS_QUEUE"]]
    assert work["type"] == "quorum"
    assert work["durable"] is True
    arguments = {name: value for name, _, value in work["arguments"]}
    assert arguments["x-dead-letter-exchange"] == names["AGENTS_DEAD_LETTER_EXCHANGE"]
    assert arguments["x-dead-letter-routing-key"] == names["AGENTS_DEAD_LETTER_QUEUE"]
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-delivery-limit"] == 7
    assert arguments["x-max-length"] == 12345
    assert arguments["x-overflow"] == "reject-publish"
    dead = queues[names["AGENTS_DEAD_LETTER_QUEUE"]]
    assert dead["type"] == "quorum" and dead["durable"] is True
    assert {
        "source_name": names["AGENTS_DEAD_LETTER_EXCHANGE"],
        "destination_name": names["AGENTS_DEAD_LETTER_QUEUE"],
        "routing_key": names["AGENTS_DEAD_LETTER_QUEUE"],
    } in bindings


def test_remote_control_reaches_only_this_deployments_workers(workers, settings):
    """Each deployment (each test run's namespace) broadcasts ``inspect`` and ``ping`` on
    its own control exchange, named after its work queue: another deployment's
    broadcast on the same virtual host (here, Celery's default exchange) never reaches
    this one's workers, and this one's reaches them."""
    from celery import Celery

    from agents_project.celery import app

    assert app.conf.control_exchange == f"{settings.AGENTS['QUEUE']}.control"
    workers.start(concurrency=1)
    node = workers.node_name(0)
    assert wait_until(lambda: node in (app.control.inspect(timeout=2).ping() or {}), timeout=30)
    elsewhere = Celery(broker=settings.CELERY_BROKER_URL)
    elsewhere.conf.control_exchange = "celery"
    with elsewhere.connection_for_write() as conn:
        replies = elsewhere.control.inspect(timeout=2, connection=conn).ping() or {}
    assert node not in replies
