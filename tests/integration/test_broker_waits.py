"""Workers wait for RabbitMQ: started before it is reachable, and after losing it; and
a SIGTERM stops a worker within its grace even while the broker is gone.

Each test runs a private RabbitMQ (tests/integration/servers.py) that it can stop and
start without touching the machine's shared one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agents.models import AgentTask, TaskStatus
from tests.helpers import wait_until, worker_env
from tests.integration.servers import free_port, private_rabbitmq

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
# A worker used to give up after its 11th attempt to reach the broker at start-up
# ("Unrecoverable error"); waiting past that many proves it keeps waiting.
OLD_START_UP_ATTEMPTS = 11


class RefusingBroker:
    """Listens on the broker's port, counts connection attempts and drops each at once,
    as a broker that is not up yet would (without the kernel's instant refusal)."""

    def __init__(self, port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.server.settimeout(0.2)
        self.attempts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.attempts += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


@contextmanager
def refusing(port: int) -> Iterator[RefusingBroker]:
    broker = RefusingBroker(port)
    try:
        yield broker
    finally:
        broker.close()


def run_agent(broker_url: str, script: list[dict]) -> subprocess.CompletedProcess[str]:
    """``manage.py run_agent scripted --wait``, publishing to ``broker_url``."""
    import json

    return subprocess.run(
        [
            sys.executable,
            "manage.py",
            "run_agent",
            "scripted",
            "--input",
            json.dumps({"script": script}),
            "--wait",
            "--timeout",
            "300",
        ],
        cwd=ROOT,
        env={**os.environ, **worker_env(CELERY_BROKER_URL=broker_url)},
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_a_worker_started_before_the_broker_waits_for_it_and_then_works(workers):
    with private_rabbitmq() as rabbit:
        rabbit.stop()
        with refusing(rabbit.port) as down:
            worker = workers.start(concurrency=1, CELERY_BROKER_URL=rabbit.url)
            wait_until(
                lambda: down.attempts > OLD_START_UP_ATTEMPTS or worker.poll() is not None,
                timeout=600,
                interval=0.5,
            )
            assert worker.poll() is None, workers.report()
        rabbit.start()
        done = run_agent(rabbit.url, [{"think": "the broker is here"}, {"final": "ok"}])
        assert done.returncode == 0, done.stdout + done.stderr + workers.report()
        assert AgentTask.objects.get(status=TaskStatus.COMPLETED).result == "ok"


def test_a_worker_that_loses_the_broker_reconnects_when_it_is_back(workers):
    with private_rabbitmq() as rabbit:
        worker = workers.start(concurrency=1, CELERY_BROKER_URL=rabbit.url)
        first = run_agent(rabbit.url, [{"final": "before"}])
        assert first.returncode == 0, first.stdout + first.stderr + workers.report()
        rabbit.stop()
        with refusing(rabbit.port) as down:
            wait_until(lambda: down.attempts >= 3, timeout=300, interval=0.5)
            assert worker.poll() is None, workers.report()
        rabbit.start()
        second = run_agent(rabbit.url, [{"final": "after"}])
        assert second.returncode == 0, second.stdout + second.stderr + workers.report()
        assert worker.poll() is None


def test_sigterm_stops_a_worker_within_its_grace_while_the_broker_is_gone(workers):
    with private_rabbitmq() as rabbit:
        worker = workers.start(
            concurrency=1, CELERY_BROKER_URL=rabbit.url, AGENTS_SHUTDOWN_GRACE="3"
        )
        task_run = threading.Thread(
            target=run_agent, args=(rabbit.url, [{"sleep": 600}, {"final": "late"}])
        )
        task_run.daemon = True
        task_run.start()
        wait_until(
            lambda: AgentTask.objects.filter(status=TaskStatus.RUNNING).exists(),
            timeout=120,
        )
        rabbit.stop()
        worker.terminate()  # SIGTERM to the main process, as Kubernetes sends it
        # The step would run for ten minutes; the grace is 3 s. Far below either bound,
        # the worker must be gone (it used to take 240 s with the broker down).
        worker.wait(timeout=60)
        assert worker.returncode is not None, workers.report()


def test_sigterm_stops_a_worker_still_waiting_for_the_broker_at_start(workers):
    with refusing(free_port()) as down:
        url = f"amqp://guest:guest@127.0.0.1:{down.server.getsockname()[1]}//"
        worker = workers.start(concurrency=1, CELERY_BROKER_URL=url, AGENTS_SHUTDOWN_GRACE="3")
        wait_until(lambda: down.attempts >= 2 or worker.poll() is not None, timeout=120)
        assert worker.poll() is None, workers.report()
        worker.terminate()
        worker.wait(timeout=60)
    assert worker.returncode is not None, workers.report()
