"""Flower, started as the README says, finds a running worker through its HTTP API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import log_dir, tail, wait_until, worker_env
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

AUTH = ("ops", "flower-test-password")


@pytest.fixture
def flower(transactional_db) -> Iterator[str]:
    """``celery -A agents_project flower`` on a free port, against the test broker."""
    port = free_port()
    path = log_dir() / "flower.log"
    with open(path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "agents_project",
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
                f"--basic-auth={AUTH[0]}:{AUTH[1]}",
            ],
            env={**os.environ, **worker_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    print(f"--- {path}\n{tail(path)}")


def test_flower_lists_the_running_worker(workers, flower):
    workers.start(concurrency=1)
    node = workers.node_name(0)

    def listed() -> dict | None:
        try:
            response = httpx.get(
                f"{flower}/api/workers", params={"refresh": "true"}, auth=AUTH, timeout=10
            )
        except httpx.TransportError:
            return None  # Flower is still starting
        if response.status_code != 200:
            return None
        mine = {k: v for k, v in response.json().items() if k == node}
        return mine or None

    mine = wait_until(listed, timeout=90, interval=1)
    [(name, info)] = mine.items()
    assert "agents.run_step" in info["registered"]
    queues = [queue["name"] for queue in info["active_queues"]]
    assert os.environ["AGENTS_QUEUE"] in queues
    assert info["stats"]["pool"]["max-concurrency"] == 1
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
